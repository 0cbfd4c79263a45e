//! Vision tower (transformers `MllamaVisionModel`): patch conv, gated pre-tile embedding, class token, gated
//! positional embedding with its tile part, layernorm_pre, padding of patches to a multiple of 8, local transformer
//! with the aspect-ratio mask, layernorm_post, gated post-tile embedding, global transformer with tanh gates,
//! padding removal, concat with the intermediate layers' outputs. Canonical prefix: `model.vision_model.`.
use tch::{Kind, Tensor};

use super::config::{Activation, VisionConfig};
use super::lora::Linear;
use super::ops::{
    attend, dtype_min, merge_heads, project_heads, AttentionImpl, AttnMask, LayerNorm,
};
use super::text::{linear, visit_linear, LinearVisitor, ParamVisitor};
use super::weights::Loader;
use super::ModelError;

pub const PREFIX: &str = "model.vision_model";

fn layer_norm(ld: &mut Loader, p: &str, n: i64, eps: f64) -> LayerNorm {
    LayerNorm {
        weight: ld.get(&format!("{p}.weight"), &[n]),
        bias: ld.get(&format!("{p}.bias"), &[n]),
        eps,
    }
}

/// `MllamaVisionEncoderLayer` (gated in the global transformer).
#[derive(Debug)]
pub struct VisionEncoderLayer {
    pub prefix: String,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub fc1: Linear,
    pub fc2: Linear,
    pub input_layernorm: LayerNorm,
    pub post_attention_layernorm: LayerNorm,
    /// (gate_attn, gate_ffn), each (1,), in global layers.
    pub gates: Option<(Tensor, Tensor)>,
    pub num_heads: i64,
    pub head_dim: i64,
    pub act: Activation,
    pub attention: AttentionImpl,
}

impl VisionEncoderLayer {
    fn load(
        ld: &mut Loader,
        p: &str,
        c: &VisionConfig,
        gated: bool,
        attention: AttentionImpl,
    ) -> Self {
        let h = c.hidden_size;
        let a = format!("{p}.self_attn");
        Self {
            q_proj: linear(ld, &format!("{a}.q_proj"), h, h, false),
            k_proj: linear(ld, &format!("{a}.k_proj"), h, h, false),
            v_proj: linear(ld, &format!("{a}.v_proj"), h, h, false),
            o_proj: linear(ld, &format!("{a}.o_proj"), h, h, false),
            fc1: linear(ld, &format!("{p}.mlp.fc1"), c.intermediate_size, h, true),
            fc2: linear(ld, &format!("{p}.mlp.fc2"), h, c.intermediate_size, true),
            input_layernorm: layer_norm(ld, &format!("{p}.input_layernorm"), h, c.norm_eps),
            post_attention_layernorm: layer_norm(
                ld,
                &format!("{p}.post_attention_layernorm"),
                h,
                c.norm_eps,
            ),
            gates: gated.then(|| {
                (
                    ld.get(&format!("{p}.gate_attn"), &[1]),
                    ld.get(&format!("{p}.gate_ffn"), &[1]),
                )
            }),
            num_heads: c.attention_heads,
            head_dim: c.head_dim(),
            act: c.hidden_act,
            attention,
            prefix: p.to_string(),
        }
    }

    /// hidden (N, L, D) with the aspect-ratio mask over (L, L) -> (N, L, D).
    pub fn forward(&self, hidden: &Tensor, mask: &AttnMask) -> Result<Tensor, ModelError> {
        let x = self.input_layernorm.forward(hidden);
        let q = project_heads(&self.q_proj, &x, self.num_heads, self.head_dim); // (N, H, L, d)
        let k = project_heads(&self.k_proj, &x, self.num_heads, self.head_dim); // (N, H, L, d)
        let v = project_heads(&self.v_proj, &x, self.num_heads, self.head_dim); // (N, H, L, d)
        let o = attend(
            self.attention,
            &q,
            &k,
            &v,
            mask,
            (self.head_dim as f64).powf(-0.5),
        )?; // (N, H, L, d)
        let mut a = self.o_proj.forward(&merge_heads(&o)); // (N, L, D)
        if let Some((g, _)) = &self.gates {
            a = g.tanh() * a;
        }
        let h = hidden + a;
        let mut m = self.fc2.forward(
            &self
                .act
                .apply(&self.fc1.forward(&self.post_attention_layernorm.forward(&h))),
        );
        if let Some((_, g)) = &self.gates {
            m = g.tanh() * m;
        }
        Ok(h + m)
    }

    pub fn visit(&self, f: &mut ParamVisitor) {
        for l in [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.fc1,
            &self.fc2,
        ] {
            visit_linear(l, f);
        }
        let p = &self.prefix;
        for (n, ln) in [
            ("input_layernorm", &self.input_layernorm),
            ("post_attention_layernorm", &self.post_attention_layernorm),
        ] {
            f(&format!("{p}.{n}.weight"), &ln.weight);
            f(&format!("{p}.{n}.bias"), &ln.bias);
        }
        if let Some((a, b)) = &self.gates {
            f(&format!("{p}.gate_attn"), a);
            f(&format!("{p}.gate_ffn"), b);
        }
    }

    pub fn visit_linears(&mut self, f: &mut LinearVisitor) {
        for l in [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
            &mut self.fc1,
            &mut self.fc2,
        ] {
            f(l);
        }
    }
}

/// `MllamaPrecomputedAspectRatioEmbedding` (gated).
#[derive(Debug)]
pub struct AspectRatioEmbedding {
    pub embedding: Tensor, // (max_aspect_ratio_id + 1, T * D)
    pub gate: Tensor,      // (1,)
}

impl AspectRatioEmbedding {
    /// hidden (N, T, P, D), ids (N, 1) -> (N, T, P, D).
    fn forward(&self, hidden: &Tensor, ids: &Tensor, tiles: i64, dim: i64) -> Tensor {
        let e =
            Tensor::embedding(&self.embedding, ids, -1, false, false).reshape([-1, tiles, 1, dim]); // (N, T, 1, D)
        hidden + e * self.gate.tanh()
    }
}

/// Per-batch constants of the vision forward (see [`VisionModel::prepare`]).
#[derive(Debug)]
pub struct VisionPrep {
    pub b: i64,
    pub m: i64,
    pub t: i64,
    /// Patches per tile + the class token.
    pub p1: i64,
    /// `p1` padded to a multiple of 8.
    pub l: i64,
    pub ids: Tensor, // (BM, 1)
    /// Aspect-ratio attention mask over (T*L, T*L).
    pub mask: AttnMask,
}

/// `MllamaVisionModel`.
#[derive(Debug)]
pub struct VisionModel {
    pub config: VisionConfig,
    pub patch_embedding: Tensor, // (D, C, p, p)
    pub class_embedding: Tensor, // (D,)
    pub pos_gate: Tensor,        // (1,)
    pub pos_embedding: Tensor,   // (P1, D)
    pub tile_embedding: Tensor,  // (max_aspect_ratio_id + 1, T * P1 * D)
    pub pre_tile: AspectRatioEmbedding,
    pub post_tile: AspectRatioEmbedding,
    pub layernorm_pre: LayerNorm,
    pub layernorm_post: LayerNorm,
    pub transformer: Vec<VisionEncoderLayer>,
    pub global_transformer: Vec<VisionEncoderLayer>,
}

impl VisionModel {
    pub fn load(ld: &mut Loader, c: &VisionConfig, attention: AttentionImpl) -> Self {
        let (d, t, p1, ar) = (
            c.hidden_size,
            c.max_num_tiles,
            c.num_patches(),
            c.max_aspect_ratio_id() + 1,
        );
        let p = PREFIX;
        let pre_tile = AspectRatioEmbedding {
            embedding: ld.get(
                &format!("{p}.pre_tile_positional_embedding.embedding.weight"),
                &[ar, t * d],
            ),
            gate: ld.get(&format!("{p}.pre_tile_positional_embedding.gate"), &[1]),
        };
        let post_tile = AspectRatioEmbedding {
            embedding: ld.get(
                &format!("{p}.post_tile_positional_embedding.embedding.weight"),
                &[ar, t * d],
            ),
            gate: ld.get(&format!("{p}.post_tile_positional_embedding.gate"), &[1]),
        };
        Self {
            patch_embedding: ld.get(
                &format!("{p}.patch_embedding.weight"),
                &[d, c.num_channels, c.patch_size, c.patch_size],
            ),
            class_embedding: ld.get(&format!("{p}.class_embedding"), &[d]),
            pos_gate: ld.get(&format!("{p}.gated_positional_embedding.gate"), &[1]),
            pos_embedding: ld.get(
                &format!("{p}.gated_positional_embedding.embedding"),
                &[p1, d],
            ),
            tile_embedding: ld.get(
                &format!("{p}.gated_positional_embedding.tile_embedding.weight"),
                &[ar, t * p1 * d],
            ),
            pre_tile,
            post_tile,
            // nn.LayerNorm(hidden_size): default eps 1e-5, not config.norm_eps.
            layernorm_pre: layer_norm(ld, &format!("{p}.layernorm_pre"), d, 1e-5),
            layernorm_post: layer_norm(ld, &format!("{p}.layernorm_post"), d, 1e-5),
            transformer: (0..c.num_hidden_layers)
                .map(|i| {
                    VisionEncoderLayer::load(
                        ld,
                        &format!("{p}.transformer.layers.{i}"),
                        c,
                        false,
                        attention,
                    )
                })
                .collect(),
            global_transformer: (0..c.num_global_layers)
                .map(|i| {
                    VisionEncoderLayer::load(
                        ld,
                        &format!("{p}.global_transformer.layers.{i}"),
                        c,
                        true,
                        attention,
                    )
                })
                .collect(),
            config: c.clone(),
        }
    }

    /// pixel_values (B, M, T, C, H, W), aspect_ratio_ids (B, M), aspect_ratio_mask (B, M, T)
    /// -> (B, M, T, P1, vision_output_dim).
    pub fn forward(
        &self,
        pixel_values: &Tensor,
        aspect_ratio_ids: &Tensor,
        aspect_ratio_mask: &Tensor,
    ) -> Result<Tensor, ModelError> {
        let prep = self.prepare(pixel_values, aspect_ratio_ids, aspect_ratio_mask)?;
        let mut h = self.stem(&prep, pixel_values);
        // intermediate_layers_indices name the layers whose INPUT is kept, as in Meta's
        // llama_models (`return_intermediate`), which the released weights were trained with, and
        // transformers 4.45 (what LLaVA-CoT and the seed used). transformers 5.24 keeps each
        // layer's output instead, one layer later; tests/fixtures/mllama_reference.py patches it
        // back for the golden fixtures.
        let mut states = Vec::with_capacity(self.transformer.len());
        for layer in &self.transformer {
            states.push(h.shallow_clone());
            h = layer.forward(&h, &prep.mask)?;
        }
        h = self.post_local(&prep, &h);
        for layer in &self.global_transformer {
            h = layer.forward(&h, &prep.mask)?;
        }
        let inter: Vec<&Tensor> = self
            .config
            .intermediate_layers_indices
            .iter()
            .map(|&i| &states[i])
            .collect();
        Ok(self.assemble(&prep, &h, &inter))
    }

    /// Shapes, aspect-ratio ids and the attention mask of one image batch (no parameters are read
    /// except the dtype of `patch_embedding`). The pieces below are the forward split at the
    /// encoder layers, so that FSDP can run each layer as its own unit.
    pub fn prepare(
        &self,
        pixel_values: &Tensor,
        aspect_ratio_ids: &Tensor,
        aspect_ratio_mask: &Tensor,
    ) -> Result<VisionPrep, ModelError> {
        let c = &self.config;
        let s = pixel_values.size();
        if s.len() != 6
            || s[2] != c.max_num_tiles
            || s[3] != c.num_channels
            || s[4] != c.image_size
            || s[5] != c.image_size
        {
            return Err(ModelError::Input(format!(
                "pixel_values: expected (B, images, {}, {}, {}, {}), found {s:?} (tiles of the \
                 vision config's image_size)",
                c.max_num_tiles, c.num_channels, c.image_size, c.image_size
            )));
        }
        let (b, m, t) = (s[0], s[1], s[2]);
        let bm = b * m;
        let kind = self.patch_embedding.kind();
        let ids = aspect_ratio_ids.reshape([bm, -1]); // (BM, 1)
        let p1 = c.num_patches();
        let pad = (8 - p1 % 8) % 8;
        let l = p1 + pad;
        let arm = aspect_ratio_mask
            .reshape([bm, -1])
            .to_device(pixel_values.device()); // (BM, T)
        let mask = match self.transformer.first().map(|l| l.attention) {
            Some(AttentionImpl::Fused) => {
                // padded queries do not see padded keys; real queries see every key (as the dense mask says)
                let pad = padding_positions(&arm, c.num_patches(), l); // (BM, T*L)

                // images without one real position: every row sees no key (AttnMask::fully_masked)
                let empty = pad.all_dim(-1, false); // (BM,)
                let fully_masked = bool::try_from(empty.any())
                    .unwrap_or(true)
                    .then(|| empty.view([bm, 1, 1, 1]));
                AttnMask {
                    key_keep: Some(pad.logical_not()),
                    query_flags: Some(pad),
                    fully_masked,
                    ..Default::default()
                }
            }
            // (BM, 1, T*L, T*L)
            Some(AttentionImpl::Sdpa) => {
                AttnMask::dense_rows(aspect_ratio_attention_mask(&arm, c.num_patches(), l, kind))
            }
            _ => AttnMask::dense(aspect_ratio_attention_mask(&arm, c.num_patches(), l, kind)),
        };
        Ok(VisionPrep {
            b,
            m,
            t,
            p1,
            l,
            ids,
            mask,
        })
    }

    /// Patch conv, tile and positional embeddings, layernorm_pre, padding:
    /// pixel_values (B, M, T, C, H, W) -> (BM, T*L, D).
    pub fn stem(&self, prep: &VisionPrep, pixel_values: &Tensor) -> Tensor {
        let c = &self.config;
        let s = pixel_values.size();
        let (t, bm, p1, l) = (prep.t, prep.b * prep.m, prep.p1, prep.l);
        let dim = c.hidden_size;
        let kind = self.patch_embedding.kind();
        let px = pixel_values
            .reshape([bm * t, s[3], s[4], s[5]])
            .to_kind(kind); // (BMT, C, H, W)
        let ids = &prep.ids;
        let pe = px.conv2d::<Tensor>(
            &self.patch_embedding,
            None,
            [c.patch_size; 2],
            [0, 0],
            [1, 1],
            1,
        ); // (BMT, D, gh, gw)
        let mut h = pe.flatten(2, -1).transpose(1, 2); // (BMT, P, D)
        let np = h.size()[1];
        h = h.reshape([bm, t, np, dim]); // (BM, T, P, D)
        h = self.pre_tile.forward(&h, ids, t, dim);
        h = h.reshape([bm * t, np, dim]);
        let cls = self.class_embedding.expand([bm * t, 1, dim], false); // (BMT, 1, D)
        h = Tensor::cat(&[&cls, &h], 1); // (BMT, P1, D)
        h = h.reshape([bm, t, p1, dim]); // (BM, T, P1, D)
        let g = self.pos_gate.tanh(); // gated positional embedding
        h = (g.ones_like() - &g) * self.pos_embedding.view([1, 1, p1, dim]) + h;
        let tile = Tensor::embedding(&self.tile_embedding, ids, -1, false, false)
            .reshape([bm, t, p1, dim]);
        h = g * tile + h;
        h = self.layernorm_pre.forward(&h);
        h = h.constant_pad_nd([0, 0, 0, l - p1]); // (BM, T, L, D)
        h.view([bm, t * l, dim])
    }

    /// layernorm_post and the gated post-tile embedding, between the local and global layers:
    /// (BM, T*L, D) -> (BM, T*L, D).
    pub fn post_local(&self, prep: &VisionPrep, h: &Tensor) -> Tensor {
        let dim = self.config.hidden_size;
        let (t, bm, l) = (prep.t, prep.b * prep.m, prep.l);
        let h = self.layernorm_post.forward(h).reshape([bm, t, l, dim]);
        self.post_tile
            .forward(&h, &prep.ids, t, dim)
            .reshape([bm, t * l, dim])
    }

    /// Drops the padding and concatenates the global output with the intermediate local states:
    /// h (BM, T*L, D), inter K x (BM, T*L, D) -> (B, M, T, P1, D*(K+1)).
    pub fn assemble(&self, prep: &VisionPrep, h: &Tensor, inter: &[&Tensor]) -> Tensor {
        let dim = self.config.hidden_size;
        let (b, m, t, p1, l) = (prep.b, prep.m, prep.t, prep.p1, prep.l);
        let bm = b * m;
        let h = h
            .reshape([bm, t, l, dim])
            .narrow(2, 0, p1)
            .reshape([b, m, t, p1, dim]); // (B, M, T, P1, D)
        let k = inter.len() as i64;
        let inter = Tensor::stack(inter, -1) // (BM, T*L, D, K)
            .reshape([bm, t, l, dim * k])
            .narrow(2, 0, p1)
            .reshape([b, m, t, p1, dim * k]); // (B, M, T, P1, D*K)
        Tensor::cat(&[&h, &inter], -1) // (B, M, T, P1, D*(K+1))
    }

    pub fn visit(&self, f: &mut ParamVisitor) {
        let p = PREFIX;
        f(
            &format!("{p}.patch_embedding.weight"),
            &self.patch_embedding,
        );
        f(&format!("{p}.class_embedding"), &self.class_embedding);
        f(
            &format!("{p}.gated_positional_embedding.gate"),
            &self.pos_gate,
        );
        f(
            &format!("{p}.gated_positional_embedding.embedding"),
            &self.pos_embedding,
        );
        f(
            &format!("{p}.gated_positional_embedding.tile_embedding.weight"),
            &self.tile_embedding,
        );
        f(
            &format!("{p}.pre_tile_positional_embedding.embedding.weight"),
            &self.pre_tile.embedding,
        );
        f(
            &format!("{p}.pre_tile_positional_embedding.gate"),
            &self.pre_tile.gate,
        );
        f(
            &format!("{p}.post_tile_positional_embedding.embedding.weight"),
            &self.post_tile.embedding,
        );
        f(
            &format!("{p}.post_tile_positional_embedding.gate"),
            &self.post_tile.gate,
        );
        for (n, ln) in [
            ("layernorm_pre", &self.layernorm_pre),
            ("layernorm_post", &self.layernorm_post),
        ] {
            f(&format!("{p}.{n}.weight"), &ln.weight);
            f(&format!("{p}.{n}.bias"), &ln.bias);
        }
        for l in self.transformer.iter().chain(&self.global_transformer) {
            l.visit(f);
        }
    }

    pub fn visit_linears(&mut self, f: &mut LinearVisitor) {
        for l in self
            .transformer
            .iter_mut()
            .chain(self.global_transformer.iter_mut())
        {
            l.visit_linears(f);
        }
    }
}

/// transformers' `_prepare_aspect_ratio_attention_mask`, step for step: aspect_ratio_mask (N, T) of 0/1 ->
/// additive (N, 1, T*L, T*L) where a pair is masked only when both the query and the key are padding (padded tile
/// or one of the last L - num_patches padded patches of a tile). As in transformers, `L == num_patches` would
/// mark every patch as padding (`[-0:]` slices everything).
pub fn aspect_ratio_attention_mask(
    aspect_ratio_mask: &Tensor,
    num_patches: i64,
    target_length: i64,
    kind: Kind,
) -> Tensor {
    let s = aspect_ratio_mask.size();
    let (n, t) = (s[0], s[1]);
    let m = aspect_ratio_mask
        .view([n, t, 1, 1])
        .to_kind(kind)
        .repeat([1, 1, target_length, 1]); // (N, T, L, 1)
    let pad = target_length - num_patches;
    let start = if pad == 0 { 0 } else { target_length - pad };
    let _ = m.narrow(2, start, target_length - start).fill_(0.0);
    let inv = (m.ones_like() - m).reshape([n, t * target_length, 1]); // (N, T*L, 1)
    (inv.matmul(&inv.transpose(-1, -2)) * dtype_min(kind)).unsqueeze(1) // (N, 1, T*L, T*L)
}

/// (N, T) aspect-ratio mask -> (N, T*L) bool, true for padding: a masked tile, or one of the last
/// L - num_patches positions of a tile (all of them when L == num_patches, as in transformers).
pub fn padding_positions(
    aspect_ratio_mask: &Tensor,
    num_patches: i64,
    target_length: i64,
) -> Tensor {
    let s = aspect_ratio_mask.size();
    let (n, t) = (s[0], s[1]);
    let pad = target_length - num_patches;
    let start = if pad == 0 { 0 } else { target_length - pad };
    let idx = Tensor::arange(target_length, (Kind::Int64, aspect_ratio_mask.device())).view([
        1,
        1,
        target_length,
    ]);
    let pad_patch = idx.ge(start); // (1, 1, L)
    let tile_off = aspect_ratio_mask.eq(0).view([n, t, 1]); // (N, T, 1)
    tile_off
        .logical_or(&pad_patch)
        .reshape([n, t * target_length])
}
