"""Official PyTorch CALM / Hugging Face Llama checkpoints ↔ calm-jax Orbax checkpoints.

    calm-convert --ae AE_DIR [--calm CALM_DIR] [--llama LLAMA_DIR] --out RUN_DIR
    calm-convert --export RUN_DIR/calm --out REF_DIR [--format safetensors|npz]

A source is a Hugging Face-style directory: `config.json` plus weights as `model.safetensors`,
`*.npz` or `pytorch_model.bin` (sharded `*.index.json` variants too; `.bin` needs torch). The
autoencoder is written to RUN_DIR/autoencoder, the CALM model to RUN_DIR/calm (its
`train.autoencoder` pointing at the former), a Llama baseline to RUN_DIR/ar; each holds a step-0
checkpoint, a `config.yaml` usable by `sample.py` / `python -m calm.evaluate`, and the source's
tokenizer files if it has any. A CALM config.json's `model_type` (energy, flow or diffusion)
selects the generative head, in both directions.
"""

from calm.convert.hf_config import (build_config, config_fields, merge_fields, read_config_json,
                                    reference_config)
from calm.convert.names import (expected_params, from_params, normalize, table,
                                to_params)
from calm.convert.runs import convert, export_reference, write_run
from calm.convert.weights import read_weights

__all__ = ["build_config", "config_fields", "convert", "expected_params",
           "export_reference", "from_params", "merge_fields", "normalize",
           "read_config_json", "read_weights", "reference_config", "table", "to_params",
           "write_run"]
