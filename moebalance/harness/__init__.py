"""The inference harness both frameworks share (``scripts/infer.py`` is its entry point).

- ``config``: ``RunConfig`` (one run, one YAML file in ``moebalance/configs/runs``) and ``resolve``, which
  validates a whole run before any process group starts;
- ``cli``: the command line onto ``RunConfig``;
- ``framework``: the ``Framework`` interface each adapter implements
  (``megatron_patch.harness``, ``deepspeed_patch.harness``) and ``get_framework``;
- ``data``: prompts, the lockstep batch, held-out sequences;
- ``generate``: the lockstep generation loop under ``torch.inference_mode`` and its end-to-end
  figures;
- ``quality``: teacher-forced perplexity and accuracy per domain;
- ``report``: environment capture, the tables, the JSON report (written atomically after every
  router).
"""

from .config import FRAMEWORKS, VANILLA, Run, RunConfig, load_run_config, resolve
from .framework import Framework, get_framework

__all__ = [
    "FRAMEWORKS",
    "VANILLA",
    "Framework",
    "Run",
    "RunConfig",
    "get_framework",
    "load_run_config",
    "resolve",
]
