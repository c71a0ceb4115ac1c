"""scripts/plot_metrics.py: a workdir's event files -> one PNG of curves."""
import os
import sys

from clu import metric_writers
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import plot_metrics  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_plots_the_panels_a_run_logged(tmp_path, capsys):
  writer = metric_writers.create_default_writer(str(tmp_path), just_logging=False)
  for step in range(1, 6):
    writer.write_scalars(step, {"critic/score/mean": -1 + 0.3 * step, "actor/entropy": 1.0 / step,
                                "response_length/mean": 20.0 + step, "actor/pg_clipfrac": 0.01 * step,
                                "train/kept_groups": 4.0, "train/dropped_groups": 1.0})
  for step in (0, 5):
    writer.write_scalars(step, {f"val-core/arith/acc/mean@{k}": 0.1 * step / k for k in (1, 2, 4)})
  writer.close()
  output = tmp_path / "plots" / "curves.png"
  plot_metrics.main(["--workdir", str(tmp_path), "--output", str(output)])
  assert "6 of 6 panels with data" in capsys.readouterr().out
  image = Image.open(output)
  assert image.size[0] > 1000 and image.size[1] > 500
  assert np.asarray(image.convert("L")).std() > 10  # not a blank canvas
  # Only the largest k of each validation metric is drawn.
  series = plot_metrics._series({f"val-core/arith/acc/mean@{k}": [(0, 0.0)] for k in (1, 2, 4)},
                                r"val-core/(.+)/acc/mean@(\d+)", "{0} avg@{1}")
  assert [name for name, _ in series] == ["arith avg@4"]


def test_a_directory_without_event_files_is_an_error_naming_it(tmp_path):
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no scalar metrics"):
    plot_metrics.plot(str(tmp_path), str(tmp_path / "x.png"))
