"""torch -> ONNX as the three graphs the edge runs, with a parity check against torch.

    image_encoder.onnx  image (B,1,S,S) float32            -> patches (B,P,d)
    text_encoder.onnx   input_ids, attention_mask (N,L) int32 -> text_features (N,M,d)
    scorer.onnx         patches (B,P,d), text_features (N,M,d) -> rewards (B,N)

Token inputs are int32 (TensorRT has no int64 tensors); the graph casts them inside. The
batch and candidate axes are dynamic. Thresholds are not in any graph: they are runtime
inputs of the appliance's decide step, with defaults in the manifest.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.errors import ModelError
from models.reward_model import RewardModel

OPSET = 17
IMAGE_ENCODER, TEXT_ENCODER, SCORER = "image_encoder.onnx", "text_encoder.onnx", "scorer.onnx"


class ParityError(ModelError):
    """An exported graph disagrees with the torch model beyond the tolerance."""


class _Int32Text(nn.Module):
    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        return self.encoder(input_ids.long(), attention_mask.long())


def _export(module, args, path, inputs, outputs, dynamic, opset):
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)   # the fused kernel has no ONNX form
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        _torch_onnx_export(module, args, path, inputs, outputs, dynamic, opset)
    torch.backends.mha.set_fastpath_enabled(fastpath)


def _torch_onnx_export(module, args, path, inputs, outputs, dynamic, opset):
    torch.onnx.export(module.eval(), args, str(path), input_names=inputs, output_names=outputs,
                      dynamic_axes=dynamic, opset_version=opset, dynamo=False, do_constant_folding=True)


def torch_to_onnx(model: RewardModel, out_dir: Path, opset: int = OPSET) -> dict[str, Path]:
    """Write the three graphs into out_dir; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    cfg = model.config
    image = torch.zeros(2, 1, cfg.image_size, cfg.image_size)
    ids = torch.full((3, cfg.max_tokens), 101, dtype=torch.int32)
    mask = torch.ones(3, cfg.max_tokens, dtype=torch.int32)
    text = _Int32Text(model.text_encoder).eval()
    with torch.no_grad():
        patches, features = model.image_encoder(image), text(ids, mask)
    paths = {"image_encoder": out_dir / IMAGE_ENCODER, "text_encoder": out_dir / TEXT_ENCODER,
             "scorer": out_dir / SCORER}
    _export(model.image_encoder, (image,), paths["image_encoder"], ["image"], ["patches"],
            {"image": {0: "batch"}, "patches": {0: "batch"}}, opset)
    _export(text, (ids, mask), paths["text_encoder"], ["input_ids", "attention_mask"], ["text_features"],
            {"input_ids": {0: "candidates"}, "attention_mask": {0: "candidates"},
             "text_features": {0: "candidates"}}, opset)
    _export(model.scorer, (patches, features), paths["scorer"], ["patches", "text_features"], ["rewards"],
            {"patches": {0: "batch"}, "text_features": {0: "candidates"},
             "rewards": {0: "batch", 1: "candidates"}}, opset)
    for path in paths.values():
        onnx_to_folded_onnx(path)
    return paths


def onnx_to_folded_onnx(path: Path) -> Path:
    """Constant-fold and fuse the graph in place (onnxruntime's basic, semantics-preserving level:
    standard ONNX ops only, so TensorRT reads it too). It matters for INT8: the exporter writes
    EfficientNet's 'same' padding as Pad nodes fed by shape arithmetic, which the quantizer cannot
    quantize, so every one of them cost a DequantizeLinear/Pad/QuantizeLinear round trip; folded,
    the padding moves into the Conv and the INT8 image encoder runs about 1.6x faster."""
    from onnxruntime.quantization.shape_inference import quant_pre_process
    path = Path(path)
    tmp = path.with_name(path.stem + ".folding.onnx")
    try:
        quant_pre_process(str(path), str(tmp), skip_symbolic_shape=True)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@torch.no_grad()
def torch_rewards(model: RewardModel, image: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    model.eval()
    patches = model.image_encoder(torch.from_numpy(image))
    features = model.text_encoder(torch.from_numpy(ids).long(), torch.from_numpy(mask).long())
    return model.scorer(patches, features).numpy()


def onnx_rewards(graph_dir: Path, image: np.ndarray, ids: np.ndarray, mask: np.ndarray,
                 scorer: str = SCORER, image_encoder: str = IMAGE_ENCODER) -> np.ndarray:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    run = lambda name, feed: ort.InferenceSession(str(Path(graph_dir) / name), opts,  # noqa: E731
                                                  providers=["CPUExecutionProvider"]).run(None, feed)[0]
    patches = run(image_encoder, {"image": image})
    features = run(TEXT_ENCODER, {"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32)})
    return run(scorer, {"patches": patches, "text_features": features})


def check_parity(model: RewardModel, graph_dir: Path, image: np.ndarray, ids: np.ndarray,
                 mask: np.ndarray, tolerance: float = 1e-4) -> dict:
    """Max |reward difference| torch vs ONNX fp32 on golden frames x candidates; raises if over."""
    expected = torch_rewards(model, image, ids, mask)
    got = onnx_rewards(graph_dir, image, ids, mask)
    delta = float(np.abs(expected - got).max())
    result = {"max_abs_reward_delta": delta, "tolerance": tolerance, "frames": int(image.shape[0]),
              "candidates": int(ids.shape[0]), "top1_agreement": float((expected.argmax(1) == got.argmax(1)).mean())}
    if delta > tolerance:
        raise ParityError(f"ONNX fp32 rewards differ from torch by {delta:.2e} (> {tolerance:.0e}) on "
                          f"{image.shape[0]} golden frames; the export is wrong, do not ship it")
    return result
