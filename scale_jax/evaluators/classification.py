"""Linear-probe classification of product features."""
import jax
import jax.numpy as jnp
import numpy as np
import optax


def linear_probe(train_x, train_y, test_x, test_y, steps, lr, num_classes=None) -> float:
  """Test accuracy of softmax regression fitted on train features.

  Features are standardised with the train split's mean and std; the regression is fitted full
  batch with AdamW (weight decay 1e-4) for `steps` steps in one jitted lax.scan. num_classes
  defaults to the largest label in either split + 1.
  """
  train_x = np.asarray(train_x, np.float32)
  test_x = np.asarray(test_x, np.float32)
  train_y, test_y = np.asarray(train_y), np.asarray(test_y)
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
  if num_classes is None:
    num_classes = int(max(train_y.max(initial=0), test_y.max(initial=0))) + 1
  params = (jnp.zeros((train_x.shape[1], num_classes)), jnp.zeros(num_classes))
  tx = optax.adamw(lr, weight_decay=1e-4)

  # x and y are arguments, not closed over: closed-over arrays become constants in the program.
  @jax.jit
  def fit(params, x, y):
    def loss(p):
      return optax.softmax_cross_entropy_with_integer_labels(x @ p[0] + p[1], y).mean()

    def step(carry, _):
      p, s = carry
      updates, s = tx.update(jax.grad(loss)(p), s, p)
      return (optax.apply_updates(p, updates), s), None

    return jax.lax.scan(step, (params, tx.init(params)), length=steps)[0][0]

  w, b = fit(params, jnp.asarray(train_x), jnp.asarray(train_y, jnp.int32))
  return float(np.mean(np.argmax(test_x @ np.asarray(w) + np.asarray(b), 1) == test_y))
