"""What every run settles before its work, in one order: the manifest and the model opened
(a wrong option fails here, before Ray starts), Ray, then where the stages go, the dtype the
towers compute in, and the provenance the vectors will carry."""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import ray

from pipeline import storage
from pipeline.config import EmbedConfig, named
from pipeline.embed.model import ModelSpec, locate_model, open_model, resolve_dtype
from pipeline.embed.provenance import provenance
from pipeline.read.manifest import Manifest, open_manifest
from pipeline.run.stages import Placement, configure_ray_data, ensure_ray, plan_placement


@dataclass(frozen=True)
class Run:
    config: EmbedConfig
    manifest: Manifest
    model: ModelSpec
    placement: Placement
    dtype: str  # what the towers compute in
    provenance: dict
    setup_seconds: float  # opening the manifest and the model (what of it Ray's start did not overlap)
    ray_seconds: float  # starting Ray (0: it was running)
    notes: tuple[str, ...] = ()  # what the run settled that the user did not ask for, to be said


def prepare_run(config: EmbedConfig, progress_bars: bool, check_out: bool = True) -> Run:
    """The run `config` asks for, settled; with `check_out`, OUT (where given) is writable.
    The run's config is the one to go on with: a manifest without captions runs the image
    tower only, one without images the text tower only."""
    started = time.perf_counter()
    config = dataclasses.replace(config, manifest=storage.absolute(config.manifest),
                                 out=storage.absolute(config.out), db=storage.absolute(config.db))
    # A folder of images is listed into OUT, unless the run is to write nothing (see image_folder).
    manifest = open_manifest(config, listing_dest=config.out if check_out else None)
    notes = ()
    # Images without captions are a corpus, not rows of empty captions (and captions without
    # images likewise): the tower with nothing to embed does not run.
    if manifest.caption_col is None and "text" in config.towers:
        config = dataclasses.replace(config, towers=("image",))
        notes = (f"no captions: image tower only (name a column of captions with {named('caption_col')})",)
    elif manifest.image_col is None and "image" in config.towers:
        config = dataclasses.replace(config, towers=("text",))
        notes = (f"no images: text tower only (name a column of images with {named('image_col')})",)
    if check_out and config.out:
        storage.check_writable(config.out, config.storage_options)
    folder = locate_model(config.model, config.storage_options)
    ray_running = ray.is_initialized()
    # The model found, it is opened (transformers' and torch's imports: 2-3 s) while Ray starts
    # (3-5 s, mostly waiting on its own processes): only a folder whose files transformers
    # refuses fails after Ray has started.
    with ThreadPoolExecutor(1, thread_name_prefix="open-model") as pool:
        opening = pool.submit(open_model, folder)
        starting = time.perf_counter()
        ensure_ray(config.address, verbose=config.verbose)
        ray_seconds = 0.0 if ray_running else time.perf_counter() - starting
        model = opening.result()
    setup_seconds = time.perf_counter() - started - ray_seconds
    configure_ray_data(progress_bars=progress_bars, verbose=config.verbose)
    placement = plan_placement(config)
    dtype = resolve_dtype(config.dtype, on_gpu=placement.on_gpu)
    return Run(config, manifest, model, placement, dtype,
               provenance(model, dtype, config.towers, config.preprocess, config.vector_dtype),
               setup_seconds, ray_seconds, notes)
