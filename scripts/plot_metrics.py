"""Draws a training run's curves from the TensorBoard event files of its workdir into one PNG.

    python scripts/plot_metrics.py --workdir runs/default [--output runs/default/curves.png]

Panels: held-out accuracy (validation avg@k, best@k and maj@k at the run's k, and pass@1, per data source), the
training score (unshaped, and with the overlong penalty as verl's critic/score) and the accuracy before dynamic
sampling, policy entropy, response length, clip fractions, and the groups dynamic sampling kept and dropped. A panel whose metrics the run did not log says so instead of being left out.
"""
import argparse
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")  # files only: no display on a TPU VM or in CI
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
from matplotlib import ticker  # pylint: disable=g-import-not-at-top

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dapo_jax import metrics  # pylint: disable=g-import-not-at-top,wrong-import-position

# (title, y label, [(tag or regex over tags, legend label)]) per panel; a regex's groups fill its label.
PANELS = [
    # verl's validation names (dapo_jax.metrics): mean@n, best@n/mean and maj@n/mean (n: the samples per problem)
    # are val-core; other k, pass@k and the std statistics are val-aux.
    ("Held-out accuracy", "accuracy", [
        (r"val-core/(.+)/acc/mean@(\d+)", "{0} avg@{1}"),
        (r"val-core/(.+)/acc/best@(\d+)/mean", "{0} best@{1}"),
        (r"val-core/(.+)/acc/maj@(\d+)/mean", "{0} maj@{1}"),
        (r"val-aux/(.+)/acc/pass@1", "{0} pass@1"),
    ]),
    ("Training reward", "per response", [
        ("train/unshaped_score/mean", "score"), ("critic/score/mean", "score + overlong penalty"),
        ("train/raw_acc", "accuracy before filtering"),
    ]),
    ("Policy entropy", "nats per token", [("actor/entropy", "entropy")]),
    ("Response length", "tokens", [
        ("response_length/mean", "mean"), ("response_length/max", "max"), ("response_length/min", "min"),
    ]),
    ("Clip fractions", "share of tokens", [
        ("actor/pg_clipfrac", "clipped (eps_low / eps_high)"), ("actor/pg_clipfrac_lower", "dual clip (c)"),
    ]),
    ("Dynamic sampling", "groups per step", [
        ("train/kept_groups", "kept"), ("train/dropped_groups", "dropped"),
    ]),
]


def _series(scalars: dict, pattern: str, label: str) -> list[tuple[str, list[tuple[int, float]]]]:
  """The (legend label, curve) pairs a panel entry selects."""
  if pattern in scalars:
    return [(label, scalars[pattern])]
  out = []
  for tag in sorted(scalars):
    match = re.fullmatch(pattern, tag)
    if match and "(" in pattern:
      out.append((label.format(*match.groups()), scalars[tag]))
  # Only the largest k of each kind: avg@1 .. avg@k all on one plot would hide the curve that matters.
  by_prefix: dict[str, tuple[int, str, list]] = {}
  for name, curve in out:
    prefix, _, k = name.rpartition("@")
    rank = int(k) if k.isdigit() else 0
    if prefix not in by_prefix or rank > by_prefix[prefix][0]:
      by_prefix[prefix] = (rank, name, curve)
  return [(name, curve) for _, name, curve in by_prefix.values()] if by_prefix else out


def plot(workdir: str, output: str) -> list[str]:
  """Writes the PNG; returns the titles of the panels that had data."""
  scalars = metrics.read_scalars(workdir)
  if not scalars:
    raise FileNotFoundError(f"{workdir}: no scalar metrics found in TensorBoard event files (events.out.tfevents.*)"
                            "; pass the --workdir of a training run")
  columns = 3
  rows = -(-len(PANELS) // columns)
  figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
  drawn = []
  for ax, (title, ylabel, entries) in zip(axes.flat, PANELS):
    curves = [pair for pattern, label in entries for pair in _series(scalars, pattern, label)]
    ax.set_title(title)
    ax.set_xlabel("rollout step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    if not curves:
      ax.text(0.5, 0.5, "not logged by this run", ha="center", va="center", transform=ax.transAxes, color="gray")
      continue
    for name, curve in curves:
      steps, values = zip(*curve)
      ax.plot(steps, values, marker="o" if len(curve) < 30 else None, markersize=3, label=name)
    ax.legend(fontsize=8)
    drawn.append(title)
  for ax in list(axes.flat)[len(PANELS):]:
    ax.axis("off")
  figure.suptitle(os.path.basename(os.path.abspath(workdir)))
  figure.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  figure.savefig(output, dpi=100)
  plt.close(figure)
  return drawn


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="A training run's workdir (its TensorBoard event files).")
  parser.add_argument("--output", help="PNG to write (default: <workdir>/curves.png).")
  args = parser.parse_args(argv)
  output = args.output or os.path.join(args.workdir, "curves.png")
  drawn = plot(args.workdir, output)
  print(f"wrote {output} ({len(drawn)} of {len(PANELS)} panels with data: {', '.join(drawn)})")


if __name__ == "__main__":
  main()
