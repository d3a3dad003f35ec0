"""usp DiT / SiT <-> diffusers `DiTTransformer2DModel`: the key mapping and the config (no file is read here;
`usp.sample.diffusers` reads a diffusers folder, `usp.export.diffusers` writes one).

Key mapping (usp = DiT's official names, right = diffusers'):
    x_embedder.proj.*                  pos_embed.proj.*
    t_embedder.mlp.0 / mlp.2           transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_1 / linear_2
    y_embedder.embedding_table         transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table
    blocks.{i}.adaLN_modulation.1      transformer_blocks.{i}.norm1.linear
    blocks.{i}.attn.qkv (fused)        transformer_blocks.{i}.attn1.to_q / to_k / to_v (split in thirds)
    blocks.{i}.attn.proj               transformer_blocks.{i}.attn1.to_out.0
    blocks.{i}.mlp.fc1 / fc2           transformer_blocks.{i}.ff.net.0.proj / ff.net.2
    final_layer.adaLN_modulation.1     proj_out_1
    final_layer.linear                 proj_out_2
    pos_embed (fixed sin-cos table)    none: diffusers recomputes the same table (checked before export)

diffusers quirks this module has to respect (diffusers 0.42, `DiTTransformer2DModel` and `DiTPipeline`):
  * every block holds its own copy of the time and label embedders (the output layer reads block 0's), so the
    one usp embedder is written once per block, and read back only if all copies agree;
  * the label table always has `num_embeds_ada_norm + 1` rows and `DiTPipeline` hard-codes the null label 1000,
    so a model with fewer classes is written with num_embeds_ada_norm=1000: rows [0, K) are its classes, row
    1000 its null label, rows K..999 copies of the null row (an unused id samples unconditionally);
  * the timestep frequencies are 10000^(-k/127) (`downscale_freq_shift=1`), DiT's are 10000^(-k/128): the same
    weights see different time features (a random DiT-T's output moves by 0.4 of 2.2 at t = 999; measured in
    scripts/export_parity.py). `match_dit_time_embedding` sets the one constant back; the
    public facebook/DiT-XL-2-256 in diffusers has the same difference (its norm eps is diffusers' 1e-5, here 1e-6);
  * the position table is recomputed from the grid (a non-persistent buffer): a network whose table is not the
    sin-cos one (USP weights pretrained at another grid, resized) cannot be held, and export says so;
  * USP's affine block norms (`affine_norms=True`) have no place in diffusers; they are folded exactly into the
    adaLN modulation: (γ·LN(x) + β)(1 + s) + h = LN(x)(1 + s') + h' with s' = γ(1 + s) − 1, h' = h + β(1 + s).
"""

from __future__ import annotations

import torch

from usp.models.dit import DiT
from usp.models.vit import LAYER_NORM_EPS, sincos_2d

PIPELINE_NULL_LABEL = 1000  # DiTPipeline.__call__: class_null = [1000] * batch_size
TRANSFORMER_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")  # the public DiT folders name the latter
USP_KEY = "_usp"  # our block in the transformer's config.json; diffusers ignores keys that start with "_"
POS_EMBED_TOL = 1e-5


def transformer_config(model: DiT) -> dict:
    """The `DiTTransformer2DModel` arguments that rebuild `model`'s network."""
    mlp_hidden = model.blocks[0].mlp.fc1.out_features
    if mlp_hidden != 4 * model.hidden_size:
        raise ValueError(f"diffusers' DiT block has an MLP of 4 × width; this network has {mlp_hidden} for width "
                         f"{model.hidden_size}: it cannot be exported to diffusers")
    num_classes = model.y_embedder.num_classes
    if num_classes > PIPELINE_NULL_LABEL:
        raise ValueError(f"DiTPipeline hard-codes the null label {PIPELINE_NULL_LABEL}, so a model of {num_classes} "
                         "classes cannot be guided there; export --to hub keeps the usp layout")
    return dict(num_attention_heads=model.num_heads, attention_head_dim=model.hidden_size // model.num_heads,
                in_channels=model.in_channels, out_channels=model.out_channels, num_layers=model.depth,
                sample_size=model.input_size, patch_size=model.patch_size, activation_fn="gelu-approximate",
                num_embeds_ada_norm=PIPELINE_NULL_LABEL, norm_type="ada_norm_zero", norm_elementwise_affine=False,
                norm_eps=LAYER_NORM_EPS, attention_bias=True, dropout=0.0)


def _fold_affine_norm(weight: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                      shift: int, scale: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold LN(x)·γ + β into the adaLN chunks `shift`/`scale` of a (k·D, D) modulation layer (see the module doc)."""
    weight, bias = weight.clone(), bias.clone()
    rows_shift, rows_scale = slice(shift * width, (shift + 1) * width), slice(scale * width, (scale + 1) * width)
    w_scale, b_scale = weight[rows_scale].clone(), bias[rows_scale].clone()
    weight[rows_shift] = weight[rows_shift] + beta[:, None] * w_scale
    bias[rows_shift] = bias[rows_shift] + beta * (1 + b_scale)
    weight[rows_scale] = gamma[:, None] * w_scale
    bias[rows_scale] = gamma * (1 + b_scale) - 1
    return weight, bias


def _padded_label_table(table: torch.Tensor, num_classes: int) -> torch.Tensor:
    """usp's (K [+1 null], D) table -> diffusers' (1001, D): classes first, the null row at 1000 and in K..999."""
    null = table[num_classes] if table.shape[0] > num_classes else torch.zeros_like(table[0])
    rows = PIPELINE_NULL_LABEL + 1 - num_classes
    return torch.cat([table[:num_classes], null.unsqueeze(0).expand(rows, -1)], dim=0)


def to_diffusers_state(model: DiT) -> dict[str, torch.Tensor]:
    """`model`'s weights under diffusers' names (works on meta tensors too: no value is read)."""
    sd, width = model.state_dict(), model.hidden_size
    out = {"pos_embed.proj.weight": sd["x_embedder.proj.weight"], "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
           "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
           "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
           "proj_out_2.weight": sd["final_layer.linear.weight"], "proj_out_2.bias": sd["final_layer.linear.bias"]}
    labels = _padded_label_table(sd["y_embedder.embedding_table.weight"], model.y_embedder.num_classes)
    for i in range(model.depth):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        emb = dst + "norm1.emb."
        for j, name in ((0, "linear_1"), (2, "linear_2")):
            for p in ("weight", "bias"):
                out[f"{emb}timestep_embedder.{name}.{p}"] = sd[f"t_embedder.mlp.{j}.{p}"]
        out[emb + "class_embedder.embedding_table.weight"] = labels
        weight, bias = sd[src + "adaLN_modulation.1.weight"], sd[src + "adaLN_modulation.1.bias"]
        if model.affine_norms:  # chunks: shift_msa 0, scale_msa 1, gate_msa 2, shift_mlp 3, scale_mlp 4, gate_mlp 5
            for norm, shift, scale in (("norm1", 0, 1), ("norm2", 3, 4)):
                gamma, beta = sd[f"{src}{norm}.weight"], sd[f"{src}{norm}.bias"]
                weight, bias = _fold_affine_norm(weight, bias, gamma, beta, shift, scale, width)
        out[dst + "norm1.linear.weight"], out[dst + "norm1.linear.bias"] = weight, bias
        for p in ("weight", "bias"):
            q, k, v = sd[f"{src}attn.qkv.{p}"].chunk(3, dim=0)
            out.update({f"{dst}attn1.to_q.{p}": q, f"{dst}attn1.to_k.{p}": k, f"{dst}attn1.to_v.{p}": v,
                        f"{dst}attn1.to_out.0.{p}": sd[f"{src}attn.proj.{p}"],
                        f"{dst}ff.net.0.proj.{p}": sd[f"{src}mlp.fc1.{p}"],
                        f"{dst}ff.net.2.{p}": sd[f"{src}mlp.fc2.{p}"]})
    return out


def check_position_table(model: DiT) -> None:
    """diffusers recomputes the sin-cos table of the grid; refuse a network whose table is another one."""
    if model.pos_embed.is_meta:
        return
    expected = sincos_2d(model.hidden_size, model.grid_size).unsqueeze(0)
    diff = (model.pos_embed.detach().float().cpu() - expected).abs().max().item()
    if diff > POS_EMBED_TOL:
        raise ValueError(f"this network's position table is not the {model.grid_size}x{model.grid_size} sin-cos table "
                         f"diffusers' DiTTransformer2DModel recomputes (max difference {diff:.3g}; e.g. USP weights "
                         "pretrained at another grid and resized), so diffusers cannot hold it; export --to hub keeps "
                         "the usp layout")


def from_diffusers_state(state: dict[str, torch.Tensor], depth: int, num_classes: int,
                         null_row: int | None) -> dict[str, torch.Tensor]:
    """diffusers' names -> usp's (a non-affine-norm DiT). Every block's embedder copy must equal block 0's.

    num_classes: rows [0, K) of the label table are classes; null_row: the diffusers row holding the null label
    (None: the usp model has no null label). pos_embed is not in diffusers' state: the caller keeps the fresh table.
    """
    first = "transformer_blocks.0.norm1.emb."
    for i in range(1, depth):
        for key in [k for k in state if k.startswith(first)]:
            other = key.replace("transformer_blocks.0.", f"transformer_blocks.{i}.", 1)
            if not state[key].is_meta and not torch.equal(state[key], state[other]):
                raise ValueError(f"{other} differs from block 0's copy: usp's DiT has one time/label embedder shared "
                                 "by every block, so these weights cannot be read into it")
    table = state[first + "class_embedder.embedding_table.weight"]
    labels = table[:num_classes] if null_row is None else torch.cat([table[:num_classes], table[null_row:null_row + 1]])
    out = {"x_embedder.proj.weight": state["pos_embed.proj.weight"],
           "x_embedder.proj.bias": state["pos_embed.proj.bias"],
           "y_embedder.embedding_table.weight": labels,
           "final_layer.adaLN_modulation.1.weight": state["proj_out_1.weight"],
           "final_layer.adaLN_modulation.1.bias": state["proj_out_1.bias"],
           "final_layer.linear.weight": state["proj_out_2.weight"], "final_layer.linear.bias": state["proj_out_2.bias"]}
    for p in ("weight", "bias"):
        out[f"t_embedder.mlp.0.{p}"] = state[f"{first}timestep_embedder.linear_1.{p}"]
        out[f"t_embedder.mlp.2.{p}"] = state[f"{first}timestep_embedder.linear_2.{p}"]
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{dst}adaLN_modulation.1.{p}"] = state[f"{src}norm1.linear.{p}"]
            out[f"{dst}attn.qkv.{p}"] = torch.cat([state[f"{src}attn1.to_{x}.{p}"] for x in "qkv"], dim=0)
            out[f"{dst}attn.proj.{p}"] = state[f"{src}attn1.to_out.0.{p}"]
            out[f"{dst}mlp.fc1.{p}"] = state[f"{src}ff.net.0.proj.{p}"]
            out[f"{dst}mlp.fc2.{p}"] = state[f"{src}ff.net.2.{p}"]
    return out


def match_dit_time_embedding(transformer) -> None:
    """Give a loaded `DiTTransformer2DModel` DiT's timestep frequencies 10000^(-k/128) (diffusers: k/127), so it
    computes exactly what the usp / official DiT network computes. In place; no weight changes."""
    for block in transformer.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
