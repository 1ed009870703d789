"""The smallest teacher and student that still run every stage (64x64 frames, d_model 32): for
tests that train several times. Paste into a training config's YAML."""
MICRO_MODELS = """\
teacher: {image_size: 64, d_model: 32, text_heads: 2, fusion_heads: 2, summary_tokens: 2, max_tokens: 16, frozen_blocks: 12}
student: {image_size: 64, d_model: 32, text_heads: 2, fusion_heads: 2, summary_tokens: 2, max_tokens: 16, text_layers: 1, text_embed_dim: 8, frozen_blocks: 12}
"""
