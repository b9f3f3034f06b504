r"""The ablation study's base config: the demo's model at a budget the 2-core CPU machine can run
some thirty times in about two hours (scale_jax.experiments.ablations overrides it per run).

    python -m scale_jax.experiments.ablations --out ablations

Every run trains `total_steps` x `batch_size` products and is evaluated on the test split with
coarse retrieval (mAP@1; also across products: the query's own product's other listings left
out), fine-grained retrieval (mAP@1), a linear probe (accuracy) and k-means (NMI), on the
combinations its study compares. `--config configs/ablation.py:tiny` is the smoke-test size.
"""
from configs import demo, tiny as tiny_config


def get_config(size: str = ''):
  c = tiny_config.get_config() if size == 'tiny' else demo.get_config()
  if size == 'tiny':
    c.modalities = ('text', 'table')  # the smoke test's studies (pretraining, mem) need no more
  if size != 'tiny':
    c.total_steps = 250
    c.log_every = 25
    c.checkpoint_every = 250
    c.checkpoint_keep = 1
    c.model.update(width=96, mlp_dim=384, heads=4)
  c.eval.train_products = 1000 if size != 'tiny' else 64
  c.eval.combinations = ('text+image', 'all')  # what the studies compare
  c.evals = dict(
      coarse=dict(type='retrieval', relevance='category', every=0),
      # The synthetic catalogue lists each physical product about three times with one brand
      # word: plain coarse retrieval rewards finding those duplicates, this one the category.
      across=dict(type='retrieval', relevance='category', other_instances=True, every=0),
      fine=dict(type='retrieval', relevance='instance', every=0),
      probe=dict(type='classification', method='probe', steps=300 if size != 'tiny' else 20,
                 lr=0.01, every=0),
      clustering=dict(type='clustering', every=0),
  )
  return c
