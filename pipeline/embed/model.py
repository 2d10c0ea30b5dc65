"""Load one AltCLIP tower at a time, with the device and dtype policy, from any model reference."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline import storage
from pipeline.config import ConfigError, named
from pipeline.decode.images import ImagePreprocessing

_WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin")
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# Set in the config.json of a model of random weights (altclip make-test-model): its vectors, and
# whatever is asked of a table of them, mean nothing, and every command that answers from such a
# table says so (RANDOM_WEIGHTS_NOTE).
RANDOM_WEIGHTS_KEY = "altclip_random_weights"
RANDOM_WEIGHTS_NOTE = ("note: this table was embedded by a test model of RANDOM WEIGHTS (altclip make-test-model): "
                       "its vectors, and so these results, are MEANINGLESS")


@dataclass(frozen=True)
class ModelSpec:
    """What the driver knows of a model before any tower is loaded; workers load from it."""

    ref: str  # as the user named it: a hub id, a local folder, or a URI
    revision: str  # hub commit, or a fingerprint of the folder's files
    dim: int  # projection dimension shared by both towers
    preprocessing: ImagePreprocessing
    max_tokens: int  # longest caption in tokens, <s> and </s> included
    pad_token_id: int
    storage_options: dict = field(default_factory=dict, repr=False, compare=False)
    random_weights: bool = False  # see RANDOM_WEIGHTS_KEY

    @property
    def label(self) -> str:
        """The value of the per-row `model` column."""
        return f"{self.ref}@{self.revision}"

    def local_dir(self) -> str:
        """The model's folder on this node: fetched once per node for hub ids and URIs."""
        return _local_dir(self.ref, self.revision, tuple(sorted(self.storage_options.items())))


def resolve_model(ref: str, storage_options: dict | None = None) -> ModelSpec:
    """A hub id, a folder saved with `save_pretrained`, or its URI -> its spec (reads no weights)."""
    return open_model(locate_model(ref, storage_options))


@dataclass(frozen=True)
class ModelFolder:
    """Where a model's files are on this machine, found, before any of them is opened."""

    ref: str
    revision: str
    local_dir: str
    storage_options: dict = field(default_factory=dict, repr=False)


def locate_model(ref: str, storage_options: dict | None = None) -> ModelFolder:
    """The model's folder on this machine (fetched from the hub or a store where it is not),
    or a ConfigError naming what is wrong with `ref`: seconds, without transformers' imports."""
    storage_options = dict(storage_options or {})
    if storage.has_scheme(ref) and not storage.is_local(ref):
        revision = _remote_fingerprint(ref, storage_options)
    elif os.path.isdir(ref):
        # Recorded in outputs and tables, which other commands open from other directories.
        ref = os.path.abspath(ref)
        revision = _fingerprint(ref)
    elif os.path.exists(ref) or ref.startswith((".", "/")):
        raise ConfigError(f"{named('model')} {ref}: not a folder; name a folder saved with save_pretrained")
    else:
        revision = os.path.basename(_download(ref, None).rstrip("/"))
    return ModelFolder(ref, revision, _local_dir(ref, revision, tuple(sorted(storage_options.items()))),
                       storage_options)


def open_model(folder: ModelFolder) -> ModelSpec:
    """The spec of the model in `folder`, from its configuration, image processor and tokenizer."""
    from transformers import AltCLIPConfig, AutoImageProcessor, AutoTokenizer

    try:
        config = AltCLIPConfig.from_pretrained(folder.local_dir)
        image_processor = AutoImageProcessor.from_pretrained(folder.local_dir, backend="pil")
        tokenizer = AutoTokenizer.from_pretrained(folder.local_dir)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{named('model')} {folder.ref}: not a complete AltCLIP folder ({exc}); save model and "
            "processor there with save_pretrained"
        ) from exc
    text = config.text_config
    # XLM-R positions start after the padding index, so two positions are never used.
    max_tokens = min(tokenizer.model_max_length, text.max_position_embeddings - text.pad_token_id - 1)
    return ModelSpec(
        ref=folder.ref,
        revision=folder.revision,
        dim=config.projection_dim,
        preprocessing=ImagePreprocessing.from_image_processor(image_processor),
        max_tokens=max_tokens,
        pad_token_id=tokenizer.pad_token_id,
        storage_options=folder.storage_options,
        random_weights=bool(getattr(config, RANDOM_WEIGHTS_KEY, False)),
    )


@functools.lru_cache(maxsize=8)
def _local_dir(ref: str, revision: str, storage_options: tuple) -> str:
    if storage.has_scheme(ref) and not storage.is_local(ref):
        return _copy_to_cache(ref, revision, dict(storage_options))
    if os.path.isdir(ref):
        return os.path.abspath(ref)
    return _download(ref, revision)


def cache_root() -> str:
    return os.environ.get("ALTCLIP_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "altclip-pipeline"
    )


def _copy_to_cache(uri: str, revision: str, storage_options: dict) -> str:
    """Copy a model folder from object storage into this node's cache, once per revision."""
    target = os.path.join(cache_root(), "models", revision)
    if os.path.isdir(target):
        return target
    fs, path = storage.filesystem(uri, storage_options)
    partial = f"{target}.partial-{uuid.uuid4().hex}"
    try:
        fs.get(path.rstrip("/") + "/", partial + "/", recursive=True)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.rename(partial, target)  # whole or not at all; another process may have won
    except OSError:
        if not os.path.isdir(target):
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _remote_fingerprint(uri: str, storage_options: dict) -> str:
    """A model folder's identity in object storage: names, sizes and ETags (or mtimes)."""
    fs, path = storage.filesystem(uri, storage_options)
    try:
        files = fs.find(path.rstrip("/"), detail=True)
    except Exception as exc:  # unreachable endpoint, missing bucket, access denied
        raise ConfigError(f"{named('model')} {storage.redact(uri)}: cannot list it ({storage.describe(exc)})") from None
    if not files:
        raise ConfigError(f"{named('model')} {storage.redact(uri)}: no files there; save the model there "
                          "with save_pretrained and copy the folder up")
    digest = hashlib.sha256(uri.encode())
    for name, info in sorted(files.items()):
        tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
        digest.update(f"{name}\0{info.get('size')}\0{tag}\n".encode())
    return "sha256-" + digest.hexdigest()[:16]


def _download(repo_id: str, revision: str | None) -> str:
    from huggingface_hub import snapshot_download

    try:
        local_dir = snapshot_download(repo_id, revision=revision,
                                      allow_patterns=["*.json", "*.model", "*.safetensors"])
        if not any(os.path.exists(os.path.join(local_dir, f)) for f in _WEIGHT_FILES):
            local_dir = snapshot_download(repo_id, revision=revision,
                                          allow_patterns=["*.json", "*.model", "*.bin"])
    except Exception as exc:  # offline, unknown repo, no permission: all mean the same here
        raise ConfigError(
            f"{named('model')} {repo_id}: not a local folder, and it could not be fetched from the hub "
            f"({type(exc).__name__}: {str(exc).splitlines()[0]}); give {named('model')} as a folder "
            "saved by save_pretrained"
        ) from exc
    return local_dir


def _fingerprint(folder: str) -> str:
    """A cheap identity of a local model: config, and size + first and last MiB of each weight file."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        digest.update(name.encode())
        size = os.path.getsize(path)
        digest.update(str(size).encode())
        with open(path, "rb") as f:
            digest.update(f.read(1 << 20))
            if size > 1 << 20:
                f.seek(max(1 << 20, size - (1 << 20)))
                digest.update(f.read())
    return "sha256-" + digest.hexdigest()[:16]


def cpu_has_native_bf16() -> bool:
    check = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(check and check())


def resolve_dtype(requested: str, on_gpu: bool) -> str:
    """dtype `auto`: float16 on GPU, bfloat16 on a CPU with native bf16, else float32."""
    if requested != "auto":
        return requested
    if on_gpu:
        return "float16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def pick_device() -> torch.device:
    # An actor given a GPU that torch cannot see (a fake GPU resource) runs on the CPU.
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class ImageTower(nn.Module):
    """AltCLIP's vision tower: ViT class token -> post_layernorm -> visual_projection."""

    weight_prefixes = ("vision_model.", "visual_projection.")

    def __init__(self, config):
        from transformers import AltCLIPVisionModel

        super().__init__()
        self.vision_model = AltCLIPVisionModel._from_config(
            config.vision_config, attn_implementation="sdpa"
        )
        self.visual_projection = nn.Linear(
            config.vision_config.hidden_size, config.projection_dim, bias=False
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)

    @property
    def projection(self) -> nn.Linear:
        return self.visual_projection


class TextTower(nn.Module):
    """AltCLIP's text tower: XLM-R [CLS] -> pre_LN -> transformation -> text_projection."""

    weight_prefixes = ("text_model.", "text_projection.")

    def __init__(self, config):
        from transformers import AltCLIPTextModel

        super().__init__()
        self.text_model = AltCLIPTextModel._from_config(config.text_config, attn_implementation="sdpa")
        self.text_projection = nn.Linear(
            config.text_config.project_dim, config.projection_dim, bias=False
        )

    @property
    def vocab_size(self) -> int:
        return self.text_model.config.vocab_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        output = self.text_model(input_ids=input_ids, attention_mask=attention_mask)
        return self.text_projection(output.last_hidden_state[:, 0, :])

    @property
    def projection(self) -> nn.Linear:
        return self.text_projection


def load_tower(kind: str, local_dir: str, dtype: str, device: torch.device) -> nn.Module:
    """Build one tower and load only its weights: an image actor never holds XLM-R."""
    from transformers import AltCLIPConfig
    from transformers.initialization import no_init_weights

    config = AltCLIPConfig.from_pretrained(local_dir)
    tower_class = {"image": ImageTower, "text": TextTower}[kind]
    with no_init_weights():
        tower = tower_class(config)
    state = {_module_key(k): v for k, v in _read_weights(local_dir, tower_class.weight_prefixes).items()}
    missing, _unexpected = tower.load_state_dict(state, strict=False)
    if missing:
        raise ConfigError(f"model {local_dir} lacks {kind} tower weights: {', '.join(missing[:5])} ...")
    return tower.to(device=device, dtype=_TORCH_DTYPES[dtype]).eval()


def _module_key(checkpoint_key: str) -> str:
    """Checkpoints name encoder blocks `layer.N` (as transformers saves them); the modules, `layers.N`."""
    return re.sub(r"(^|\.)layer\.(\d+)\.", r"\1layers.\2.", checkpoint_key)


def _read_weights(local_dir: str, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    index = os.path.join(local_dir, "model.safetensors.index.json")
    single = os.path.join(local_dir, "model.safetensors")
    if os.path.exists(index) or os.path.exists(single):
        from safetensors import safe_open

        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted({v for k, v in weight_map.items() if k.startswith(prefixes)})
        else:
            files = ["model.safetensors"]
        state = {}
        for name in files:
            with safe_open(os.path.join(local_dir, name), framework="pt") as f:
                for key in f.keys():
                    if key.startswith(prefixes):
                        state[key] = f.get_tensor(key)
        return state
    bin_path = os.path.join(local_dir, "pytorch_model.bin")
    if not os.path.exists(bin_path):
        raise ConfigError(f"model {local_dir} has no weights ({' or '.join(_WEIGHT_FILES)})")
    full = torch.load(bin_path, map_location="cpu", mmap=True, weights_only=True)
    return {k: v for k, v in full.items() if k.startswith(prefixes)}
