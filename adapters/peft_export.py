"""The base model an adapter's PEFT files name, chosen so that PEFT's loaders and its merge give the adapter exactly.

Two things go wrong with a naive `base_model_name_or_path`:

* The embedded default is called `embedded:SmolLM2-135M-Instruct`, which no `from_pretrained` can load. PEFT needs
  a directory: the converted float cache (adapters.basemodel.local_path).
* SmolLM2, like most small LMs, ties `lm_head` to the input embeddings (one tensor). DALorRA adapts `lm_head`
  (the paper's setting), and PEFT's `merge_and_unload` adds ΔW = (α/r)·B·A to that one tensor, so the merged model
  also has its input embeddings moved by ΔW (measured on the default adapter: logits off by up to 0.18 nats).

For a tied base whose `lm_head` is adapted, adapter_config.json therefore names an *untied view* of the base: a
directory in the dalorra cache with the same weights (the base's weight files linked, not copied), a separate
`lm_head.weight` equal to the input embeddings, and `tie_word_embeddings: false`. Loaded from there, the base is the
same function, and merging changes only `lm_head`. It costs one copy of the embedding matrix per base and machine
(113 MB for SmolLM2 in float32), against the same 113 MB in every adapter for the alternative of saving the input
embeddings as a PEFT `modules_to_save` entry.

The path is where the base lives on the machine that saved the adapter; `python -m adapters.peft_export DIR`
points an adapter copied from elsewhere at this machine's view.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from .basemodel import EMBEDDED_NAME, cache_dir, config_hash, converted_dir, local_path, resolve_name

if TYPE_CHECKING:
    from .model import DalorraModel

INDEX = "model.safetensors.index.json"
LM_HEAD_FILE = "dalorra-untied-lm-head.safetensors"


def loadable_path(name: str | None, convert: bool = True) -> str:
    """What `from_pretrained` reads for a base called `name`: the converted cache for the embedded default (converted
    now unless `convert` is False), an absolute path for a local directory, else the name itself (a hub id)."""
    name = resolve_name(name)
    if name == EMBEDDED_NAME:
        return local_path(name) if convert or converted_dir().is_dir() else name
    p = Path(name)
    return str(p.resolve()) if p.is_dir() else name


def peft_base_path(model: DalorraModel) -> str:
    """The `base_model_name_or_path` to write for `model`: its base untied when the adapter touches a tied lm_head.
    The name stays as given where no directory with the model's architecture (config hash) is found."""
    path = loadable_path(model.base_name, convert=False)
    if not Path(path).is_dir() or _config_hash(path) != config_hash(model.base.config):
        return model.base_name
    head = (
        model.base.get_output_embeddings()
    )  # the adapter's layer, or a shared base's slot (adapters/multi.py)
    name = next((n for n, m in model.base.named_modules() if m is head), None)
    layer = model.adapted.get(name)
    if layer is not None and layer.base_layer.weight is model.base.get_input_embeddings().weight:
        return str(untied_view(path))
    return path


def _config_hash(path: str) -> str:
    from transformers import AutoConfig

    return config_hash(AutoConfig.from_pretrained(path))


def _embedding_keys(src: Path) -> tuple[str, str]:
    """(input-embedding key, output-embedding key) of the checkpoint in `src`, found on a weightless model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
    inp, out = m.get_input_embeddings(), m.get_output_embeddings()
    names = {id(mod): n for n, mod in m.named_modules()}
    return f"{names[id(inp)]}.weight", f"{names[id(out)]}.weight"


def untied_view(src: str | os.PathLike) -> Path:
    """A directory that loads as the model in `src` with `lm_head` untied from the input embeddings (built once)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src = Path(src).resolve()
    digest = hashlib.sha256(str(src).encode()).hexdigest()[:12]
    target = cache_dir() / "models" / "untied" / f"{src.name}-{digest}"
    if (target / "config.json").is_file():
        return target
    config = json.loads((src / "config.json").read_text())
    if (src / INDEX).is_file():
        weight_map = dict(json.loads((src / INDEX).read_text())["weight_map"])
    elif (src / "model.safetensors").is_file():
        with safe_open(str(src / "model.safetensors"), "pt") as f:
            weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    else:
        raise FileNotFoundError(f"{src}: no safetensors weights to untie (model.safetensors or {INDEX})")
    emb_key, head_key = _embedding_keys(src)
    if emb_key not in weight_map:
        raise KeyError(f"{src}: the input embeddings {emb_key!r} are not in its weight files")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".untie-", dir=target.parent))
    try:
        # Link everything but the config; a single `model.safetensors` is linked under a shard name, because
        # from_pretrained reads that file alone when it exists and would never see the index.
        renamed = {"model.safetensors": "dalorra-untied-base.safetensors"}
        for f in src.iterdir():
            if f.is_file() and f.name not in ("config.json", INDEX):
                os.symlink(f, tmp / renamed.get(f.name, f.name))
        with safe_open(str(src / weight_map[emb_key]), "pt") as f:
            save_file({head_key: f.get_tensor(emb_key).clone()}, str(tmp / LM_HEAD_FILE))
        weight_map = {k: renamed.get(v, v) for k, v in weight_map.items()} | {head_key: LM_HEAD_FILE}
        (tmp / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
        config["tie_word_embeddings"] = False
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "dalorra_source.json").write_text(json.dumps({"untied_from": str(src)}))
        try:
            os.replace(tmp, target)  # atomic: a crash never leaves a half-built view that loads
        except OSError:
            if not (target / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process built it first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def relink(adapter_dir: str | os.PathLike) -> str:
    """Point a DALorRA adapter's adapter_config.json at this machine's copy of its base (for an adapter trained on
    another machine). Returns the new base path."""
    d = Path(adapter_dir)
    record = json.loads((d / "dalorra.json").read_text())
    peft = json.loads((d / "adapter_config.json").read_text())
    path = loadable_path(record["base_model"]["name"])
    if Path(path).is_dir() and _ties(path):
        head = _embedding_keys(Path(path))[1].removesuffix(".weight")
        if head in peft.get("target_modules", []):
            path = str(untied_view(path))
    peft["base_model_name_or_path"] = path
    tmp = d / ".adapter_config.json.tmp"
    tmp.write_text(json.dumps(peft, indent=2))
    os.replace(tmp, d / "adapter_config.json")
    return path


def _ties(path: str) -> bool:
    return bool(json.loads((Path(path) / "config.json").read_text()).get("tie_word_embeddings", True))


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print("usage: python -m adapters.peft_export ADAPTER_DIR...\n\n" + __doc__.split("\n\n")[-1].strip())
        sys.exit(0 if len(sys.argv) > 1 else 2)
    for arg in sys.argv[1:]:
        print(f"{arg}: base_model_name_or_path = {relink(arg)}")
