"""Extract: encode every image of every split into its discrete codes, with Ray Data.

One pass over the three splits, one after another: a pool of actors each holds the stage-1
encoder (``map_batches`` with a callable class; one GPU each when ``cluster.use_gpu``), started
once for all of them. Output folder:
    codes/{train,val,test}/*.parquet   columns level0 (top) .. level{L-1}: int16 [H_l, W_l]
                                       code maps; label; index (position in the source data)
    codes/schema.json                  levels, map shapes, codebook sizes, rows per split
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .base import StageContext, StageError, StageResult
from .data import actor_pool, on_this_node, rows_per_file
from .families import load_model

SCHEMA_FILE = "schema.json"


class Encoder:
    """Ray Data actor: uint8 images -> integer code maps, one column per level."""

    def __init__(self, model: torch.nn.Module, use_gpu: bool):
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.array(batch["image"])).to(self.device)  # a writable copy
        codes = self.model.encode(x)
        out = {f"level{l}": c.cpu().numpy().astype(np.int16) for l, c in enumerate(codes)}
        out["label"] = batch["label"].astype(np.int64)
        out["index"] = batch["index"].astype(np.int64)
        if "split" in batch:
            out["split"] = batch["split"]
        return out


def read_codes(folder: Path, split: str) -> dict[str, np.ndarray]:
    """Read one split back in source order with plain pyarrow (no Ray needed):
    {"level0": int16 [N, H0, W0], ..., "label": [N], "index": [N]}. (Where Ray Data is
    imported, pyarrow reads the code maps as Ray's tensor extension type; its storage is the
    same list array either way.)"""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = json.loads((Path(folder) / SCHEMA_FILE).read_text())
    table = pq.read_table(Path(folder) / split)
    out = {c: table.column(c).to_numpy() for c in ("label", "index")}
    for l, shape in enumerate(schema["shapes"]):
        column = table.column(f"level{l}").combine_chunks()
        if isinstance(column, pa.ExtensionArray):
            column = column.storage
        flat = column.flatten().to_numpy()
        out[f"level{l}"] = flat.reshape(len(table), *shape)
    order = np.argsort(out["index"], kind="stable")
    return {k: v[order] for k, v in out.items()}


def run(ctx: StageContext) -> StageResult:
    model_dir = ctx.upstream["stage1"] / "model"
    _, model = load_model(model_dir)
    if max(model.codebook_sizes) > np.iinfo(np.int16).max:
        raise StageError(f"extract: codebook of {max(model.codebook_sizes)} codes does not fit int16 columns")
    ecfg, cluster, data = ctx.config.extract, ctx.config.cluster, ctx.data
    codes_dir = ctx.output_dir / "codes"
    splits = ("train", "val", "test")
    rows = {s: data.rows[s] for s in splits}
    # one pool for every split: a pool per split started its actors three times (the embedded
    # default: 12.6 s around 1.4 s of encoding)
    encoded = data.stream(*splits).map_batches(
        Encoder,
        # the model itself, not its folder: an actor on another node cannot see the driver's files
        fn_constructor_kwargs={"model": model, "use_gpu": cluster.use_gpu},
        batch_size=ecfg.batch_size,
        compute=actor_pool(ecfg.num_actors, cluster.use_gpu, sum(rows.values()), ecfg.batch_size),
        num_gpus=1 if cluster.use_gpu else 0,
        num_cpus=1,
    )
    # written into the driver's output folder by write tasks on the driver's node (the encoders
    # may run anywhere), a folder split=<name> per split (named <name> below), files of at most
    # the training split's rows per file (fewer files for the smaller splits)
    encoded.write_parquet(str(codes_dir), partition_cols=["split"],
                          max_rows_per_file=rows_per_file(rows["train"], data.dims),
                          # (reserving no CPU: actors may hold every CPU until the splits are encoded)
                          ray_remote_args=on_this_node(0))
    for split in splits:
        written = codes_dir / f"split={split}"
        if written.is_dir():
            written.rename(codes_dir / split)
        else:  # (a split of no rows)
            (codes_dir / split).mkdir(parents=True)
    with torch.no_grad():
        shapes = [list(c.shape[1:]) for c in model.encode(torch.from_numpy(data.read_all("train", limit=1)["image"]))]
    schema = {
        "levels": model.levels,
        "columns": [f"level{l}" for l in range(model.levels)] + ["label", "index"],
        "shapes": shapes,
        "codebook_sizes": model.codebook_sizes,
        "rows": rows,
        "num_classes": data.num_classes,
        "dtype": "int16",
    }
    (codes_dir / SCHEMA_FILE).write_text(json.dumps(schema, indent=2))
    metrics = {f"rows_{s}": float(n) for s, n in rows.items()}
    return StageResult(metrics=metrics, output_dir=ctx.output_dir,
                       datasets={s: f"codes/{s}" for s in rows})
