r"""Parameters per part and model FLOPs per training example of a config, without running it.

    python -m scale_jax.model_info --config configs/paper.py

FLOPs per training example, counting multiply-adds as 2 FLOPs, matmuls only (no softmax,
normalisation, activations, optimizer):
  transformer layer over T tokens, width D, MLP width F (model.media_mlp_dim for the media
      encoders where set):  2T(4D^2 + 2DF) + 4T^2 D
      (q, k, v and output projections, the MLP, then attention scores and the weighted sum)
  per modality: its encoder layers over its T_m tokens; patch embedding 2(T_m - 1) P_m D;
      contrastive projection 2 D E
  joint co-transformer: its layers over T = sum of T_m
  masked heads (modalities.masked(config): objective on): token modalities 2 T_m D^2 + 2 T_m D V;
      patch modalities 2 (T_m - 1) D P_m  (each modality's head_flops)
  contrastive logits: 2 B E per modality pair (each example's row of the B x B matrix)
  training = 3 x forward (the backward pass costs about twice the forward).
This is the count MFU is computed from (docs/benchmarks.md); XLA's own count of the compiled step
(what scale_jax.train logs as tflops_per_sec) also includes elementwise work and the optimizer.
"""
import argparse
import importlib.util
import itertools

import jax
import numpy as np

from scale_jax import modalities, state
from scale_jax.model.scale import encoder_shape


def layer_flops(tokens, width, mlp):
  return 2 * tokens * (4 * width ** 2 + 2 * width * mlp) + 4 * tokens ** 2 * width


def flops_per_example(config) -> dict:
  """Forward FLOPs per example by part, and 'train' = 3 x their sum."""
  m, names = config.model, modalities.active(config)
  counts = modalities.token_counts(config)
  d, f = m.width, m.mlp_dim
  parts = {}
  for k in names:
    parts[k] = (m.encoder_layers * layer_flops(counts[k], d, encoder_shape(m, k)[1])
                + 2 * d * m.embed_dim
                + modalities.get(k).embed_flops(config[k], d))
  parts['joint'] = m.joint_layers * layer_flops(sum(counts.values()), d, f)
  parts['heads'] = sum(modalities.get(k).head_flops(config[k], d, m.vocab_size)
                       for k in modalities.masked(config))
  pairs = len(list(itertools.combinations(names, 2)))
  parts['contrastive'] = pairs * 2 * config.batch_size * m.embed_dim
  parts['train'] = 3 * sum(parts.values())
  return parts


def parameter_counts(config) -> dict:
  """Parameters by top-level part of the model (shapes only: nothing is allocated)."""
  model = state.build_model(config)
  shapes = jax.eval_shape(model.init, jax.random.key(0), modalities.dummy_batch(config, 2))
  counts = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes['params'])[0]:
    name = path[0].key
    counts[name] = counts.get(name, 0) + int(np.prod(leaf.shape))
  return counts


def load_config(path):
  spec = importlib.util.spec_from_file_location('model_info_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', required=True)
  args = parser.parse_args(argv)
  config = load_config(args.config)
  params = parameter_counts(config)
  print(f'{args.config}: modalities {", ".join(modalities.active(config))}; '
        f'tokens {modalities.token_counts(config)}')
  print(f'\n{"parameters":<28}{"count":>14}')
  for name, n in sorted(params.items()):
    print(f'{name:<28}{n:>14,}')
  print(f'{"total":<28}{sum(params.values()):>14,}')
  flops = flops_per_example(config)
  print(f'\n{"forward GFLOP per example":<28}{"":>14}')
  for name, n in flops.items():
    if name != 'train':
      print(f'{name:<28}{n / 1e9:>14.3f}')
  print(f'{"training (3 x forward)":<28}{flops["train"] / 1e9:>14.3f}')
  print(f'{"training, per step":<28}{flops["train"] * config.batch_size / 1e12:>13.3f}T'
        f'  (batch {config.batch_size})')


if __name__ == '__main__':
  main()
