//! The decoder stack shared by the three families, and the 3-class score head on the last
//! non-pad token. Llama and Qwen2 run the same block (Qwen2 with q/k/v biases); Gemma-2 adds
//! the sandwich norms, the embedding scale, the soft-capped attention logits and the sliding
//! window, all switched by [`DecoderConfig`].

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var, D};

use super::{Activation, CheckpointHead, DecoderConfig, ModelConfig, NormStyle, RopeScaling};
use crate::error::{ModelError, Result};
use crate::lora::{LoraConfig, LoraLinear, LoraWeights, Projection};
use crate::profile;
use crate::weights::{SplitMix64, WeightLoader};

/// Inference uses candle's fused kernels (no backward); training uses ops autograd can
/// differentiate. Both compute the same function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardMode {
    Inference,
    Training,
}

impl ForwardMode {
    fn training(self) -> bool {
        self == Self::Training
    }
}

/// Where padding goes in a batch of rows of different lengths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaddingSide {
    Right,
    Left,
}

/// A batch of token rows padded to one length, with its attention mask.
#[derive(Debug, Clone)]
pub struct PaddedBatch {
    pub rows: usize,
    pub seq_len: usize,
    /// rows x seq_len, row-major.
    pub input_ids: Vec<u32>,
    /// 1 for a real token, 0 for padding.
    pub attention_mask: Vec<u8>,
}

impl PaddedBatch {
    /// Pads `rows` with `pad_id` on `side` to the longest row.
    pub fn pad(rows: &[&[u32]], pad_id: u32, side: PaddingSide) -> Result<Self> {
        let seq_len = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        if rows.is_empty() || seq_len == 0 {
            return Err(ModelError::Input(
                "a batch needs at least one row with at least one token".into(),
            ));
        }
        let mut input_ids = Vec::with_capacity(rows.len() * seq_len);
        let mut attention_mask = Vec::with_capacity(rows.len() * seq_len);
        for row in rows {
            let pad = seq_len - row.len();
            if side == PaddingSide::Left {
                input_ids.extend(std::iter::repeat_n(pad_id, pad));
                attention_mask.extend(std::iter::repeat_n(0u8, pad));
            }
            input_ids.extend_from_slice(row);
            attention_mask.extend(std::iter::repeat_n(1u8, row.len()));
            if side == PaddingSide::Right {
                input_ids.extend(std::iter::repeat_n(pad_id, pad));
                attention_mask.extend(std::iter::repeat_n(0u8, pad));
            }
        }
        Ok(Self {
            rows: rows.len(),
            seq_len,
            input_ids,
            attention_mask,
        })
    }

    /// Real tokens in the batch.
    pub fn real_tokens(&self) -> usize {
        self.attention_mask.iter().map(|&m| m as usize).sum()
    }
}

/// The classifier head: hidden -> num_labels, no bias, kept in f32 (or f64) as a variable
/// so that it can be trained or saved with an adapter.
#[derive(Debug, Clone)]
pub struct ScoreHead {
    pub weight: Var,
    pub trainable: bool,
}

#[derive(Debug, Clone)]
struct Layer {
    q: LoraLinear,
    k: LoraLinear,
    v: LoraLinear,
    o: LoraLinear,
    gate: LoraLinear,
    up: LoraLinear,
    down: LoraLinear,
    input_norm: Tensor,
    post_attention_norm: Tensor,
    /// Gemma-2 only.
    pre_feedforward_norm: Option<Tensor>,
    post_feedforward_norm: Option<Tensor>,
    sliding: bool,
}

impl Layer {
    fn projection(&self, p: Projection) -> &LoraLinear {
        match p {
            Projection::Q => &self.q,
            Projection::K => &self.k,
            Projection::V => &self.v,
            Projection::O => &self.o,
            Projection::Gate => &self.gate,
            Projection::Up => &self.up,
            Projection::Down => &self.down,
        }
    }

    fn projection_mut(&mut self, p: Projection) -> &mut LoraLinear {
        match p {
            Projection::Q => &mut self.q,
            Projection::K => &mut self.k,
            Projection::V => &mut self.v,
            Projection::O => &mut self.o,
            Projection::Gate => &mut self.gate,
            Projection::Up => &mut self.up,
            Projection::Down => &mut self.down,
        }
    }
}

/// What the fused kernels need of a batch: each row's real span.
struct Fused {
    bounds: Tensor,
    /// arenaflow's GPU kernels for the norms and the activation too (on the CPU only the
    /// attention is fused).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    gpu: bool,
}

/// A Llama / Qwen2 / Gemma-2 sequence classifier with optional LoRA adapters.
#[derive(Debug, Clone)]
pub struct SequenceClassifier {
    pub config: DecoderConfig,
    /// config.json as loaded, written back with a merged model.
    pub raw_config: serde_json::Value,
    embed_tokens: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    pub score: ScoreHead,
    pub lora: Option<LoraConfig>,
    dtype: DType,
    device: Device,
}

/// The dtype trainable tensors live in: f32 under a half-precision model, as PEFT keeps them.
pub fn adapter_dtype(model_dtype: DType) -> DType {
    match model_dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

const PEFT_PREFIX: &str = "base_model.model.";
const SCORE: &str = "score.weight";

impl SequenceClassifier {
    /// Loads a classifier from a checkpoint's tensors and, optionally, a PEFT LoRA adapter's.
    /// All or nothing: every tensor named by the config must be present, and nothing else.
    pub fn load(
        config: &ModelConfig,
        base: &crate::weights::TensorSource,
        adapter: Option<(&LoraConfig, &crate::weights::TensorSource)>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let cfg = &config.decoder;
        let mut loader = WeightLoader::new(base, dtype, device);
        let mut adapter_loader = adapter.map(|(lora, source)| {
            (
                lora,
                WeightLoader::new(source, adapter_dtype(dtype), device),
            )
        });
        let head_dtype = adapter_dtype(dtype);

        let (h, kv) = (cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim);
        let q_out = cfg.num_heads * cfg.head_dim;
        let embed_tokens = loader.tensor("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = |name: &str| format!("model.layers.{i}.{name}");
            let proj = |loader: &mut WeightLoader,
                        name: &str,
                        out: usize,
                        inp: usize,
                        bias: bool|
             -> Result<LoraLinear> {
                let weight = loader.tensor(&p(&format!("{name}.weight")), &[out, inp])?;
                let bias = if bias {
                    Some(loader.tensor(&p(&format!("{name}.bias")), &[out])?)
                } else {
                    None
                };
                Ok(LoraLinear {
                    weight,
                    bias,
                    lora: None,
                })
            };
            let gemma = cfg.norm == NormStyle::Gemma;
            let layer = Layer {
                q: proj(&mut loader, "self_attn.q_proj", q_out, h, cfg.qkv_bias)?,
                k: proj(&mut loader, "self_attn.k_proj", kv, h, cfg.qkv_bias)?,
                v: proj(&mut loader, "self_attn.v_proj", kv, h, cfg.qkv_bias)?,
                o: proj(&mut loader, "self_attn.o_proj", h, q_out, cfg.o_bias)?,
                gate: proj(
                    &mut loader,
                    "mlp.gate_proj",
                    cfg.intermediate_size,
                    h,
                    cfg.mlp_bias,
                )?,
                up: proj(
                    &mut loader,
                    "mlp.up_proj",
                    cfg.intermediate_size,
                    h,
                    cfg.mlp_bias,
                )?,
                down: proj(
                    &mut loader,
                    "mlp.down_proj",
                    h,
                    cfg.intermediate_size,
                    cfg.mlp_bias,
                )?,
                input_norm: norm_weight(&mut loader, &p("input_layernorm.weight"), h, cfg.norm)?,
                post_attention_norm: norm_weight(
                    &mut loader,
                    &p("post_attention_layernorm.weight"),
                    h,
                    cfg.norm,
                )?,
                pre_feedforward_norm: if gemma {
                    Some(norm_weight(
                        &mut loader,
                        &p("pre_feedforward_layernorm.weight"),
                        h,
                        cfg.norm,
                    )?)
                } else {
                    None
                },
                post_feedforward_norm: if gemma {
                    Some(norm_weight(
                        &mut loader,
                        &p("post_feedforward_layernorm.weight"),
                        h,
                        cfg.norm,
                    )?)
                } else {
                    None
                },
                sliding: cfg
                    .sliding_window
                    .as_ref()
                    .is_some_and(|w| w.layers.get(i).copied().unwrap_or(false)),
            };
            layers.push(layer);
        }
        let norm = norm_weight(&mut loader, "model.norm.weight", h, cfg.norm)?;

        // The score head: the adapter's trained copy (PEFT `modules_to_save`) replaces the
        // base's; a causal-LM checkpoint has none and must get one from an adapter.
        let adapter_has_score = adapter.is_some_and(|(lora, _)| lora.saves_score_head());
        let score_weight = match adapter_loader.as_mut() {
            Some((_, a)) if adapter_has_score => {
                loader.drop_if_present(SCORE);
                a.tensor_as(&format!("{PEFT_PREFIX}{SCORE}"), &[3, h], head_dtype)?
            }
            _ => {
                if config.head != CheckpointHead::Classifier && !loader.has(SCORE) {
                    return Err(ModelError::Config(format!(
                        "{}: no `{SCORE}`: the checkpoint is a {} without a classifier head; load it \
                         with a PEFT adapter that saved the score head (modules_to_save = [\"score\"])",
                        base.label(),
                        if config.head == CheckpointHead::CausalLm { "causal LM" } else { "bare decoder" },
                    )));
                }
                loader.tensor_as(SCORE, &[3, h], head_dtype)?
            }
        };
        if config.head == CheckpointHead::CausalLm {
            loader.drop_if_present("lm_head.weight");
        }

        let mut model = Self {
            config: cfg.clone(),
            raw_config: config.raw.clone(),
            embed_tokens,
            layers,
            norm,
            score: ScoreHead {
                weight: Var::from_tensor(&score_weight)?,
                trainable: adapter_has_score,
            },
            lora: None,
            dtype,
            device: device.clone(),
        };

        if let Some((lora, mut a)) = adapter_loader {
            let scaling = lora.scaling();
            for i in 0..model.config.num_layers {
                for p in Projection::ALL {
                    if !lora.targets(p, i)? {
                        continue;
                    }
                    let (out, inp) = model.layers[i].projection(p).weight.dims2()?;
                    let path = format!("{PEFT_PREFIX}{}", p.path(i));
                    let a_w = a.tensor(&format!("{path}.lora_A.weight"), &[lora.r, inp])?;
                    let b_w = a.tensor(&format!("{path}.lora_B.weight"), &[out, lora.r])?;
                    model.layers[i].projection_mut(p).lora = Some(LoraWeights {
                        a: Var::from_tensor(&a_w)?,
                        b: Var::from_tensor(&b_w)?,
                        scaling,
                        dropout: lora.lora_dropout,
                    });
                }
            }
            a.finish()?;
            model.lora = Some(lora.clone());
        }
        loader.finish()?;
        Ok(model)
    }

    /// Adds fresh adapters as PEFT initialises them (A Kaiming-uniform, B zero) and makes the
    /// score head trainable when `lora` saves it.
    pub fn init_lora(&mut self, lora: &LoraConfig, seed: u64) -> Result<()> {
        lora.validate()?;
        let dtype = adapter_dtype(self.dtype);
        let mut rng = SplitMix64::new(seed);
        for i in 0..self.config.num_layers {
            for p in Projection::ALL {
                if !lora.targets(p, i)? {
                    continue;
                }
                let (out, inp) = self.layers[i].projection(p).weight.dims2()?;
                let bound = 1.0 / (inp as f64).sqrt();
                let a: Vec<f64> = (0..lora.r * inp)
                    .map(|_| (2.0 * rng.next_uniform() - 1.0) * bound)
                    .collect();
                let a = Tensor::from_vec(a, (lora.r, inp), &self.device)?.to_dtype(dtype)?;
                let b = Tensor::zeros((out, lora.r), dtype, &self.device)?;
                self.layers[i].projection_mut(p).lora = Some(LoraWeights {
                    a: Var::from_tensor(&a)?,
                    b: Var::from_tensor(&b)?,
                    scaling: lora.scaling(),
                    dropout: lora.lora_dropout,
                });
            }
        }
        self.score.trainable = lora.saves_score_head();
        self.lora = Some(lora.clone());
        Ok(())
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The token that pads rows; transformers pools on the last token that is not it.
    pub fn pad_token_id(&self) -> Option<u32> {
        self.config.pad_token_id
    }

    /// The trainable variables by their PEFT names: every LoRA A and B, and the score head
    /// when it is trained.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let mut vars = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for p in Projection::ALL {
                if let Some(lora) = &layer.projection(p).lora {
                    let path = format!("{PEFT_PREFIX}{}", p.path(i));
                    vars.push((format!("{path}.lora_A.weight"), lora.a.clone()));
                    vars.push((format!("{path}.lora_B.weight"), lora.b.clone()));
                }
            }
        }
        if self.score.trainable {
            vars.push((format!("{PEFT_PREFIX}{SCORE}"), self.score.weight.clone()));
        }
        vars
    }

    /// Every weight by its Hugging Face name, with the adapters folded in: the tensors of a
    /// merged `*ForSequenceClassification` checkpoint.
    pub fn merged_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        out.insert(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.clone(),
        );
        let unnorm = |w: &Tensor| -> Result<Tensor> {
            Ok(stored_norm_weight(w, self.config.norm, self.dtype)?)
        };
        for (i, layer) in self.layers.iter().enumerate() {
            for p in Projection::ALL {
                let linear = layer.projection(p);
                out.insert(format!("{}.weight", p.path(i)), linear.merged_weight()?);
                if let Some(bias) = &linear.bias {
                    out.insert(format!("{}.bias", p.path(i)), bias.clone());
                }
            }
            let p = |name: &str| format!("model.layers.{i}.{name}.weight");
            out.insert(p("input_layernorm"), unnorm(&layer.input_norm)?);
            out.insert(
                p("post_attention_layernorm"),
                unnorm(&layer.post_attention_norm)?,
            );
            if let Some(w) = &layer.pre_feedforward_norm {
                out.insert(p("pre_feedforward_layernorm"), unnorm(w)?);
            }
            if let Some(w) = &layer.post_feedforward_norm {
                out.insert(p("post_feedforward_layernorm"), unnorm(w)?);
            }
        }
        out.insert("model.norm.weight".to_string(), unnorm(&self.norm)?);
        out.insert(
            SCORE.to_string(),
            self.score.weight.as_tensor().to_dtype(self.dtype)?,
        );
        Ok(out)
    }

    /// The 3 logits of every row, in f32, from the last token that is not the pad token
    /// (transformers' rule, which handles left and right padding alike).
    pub fn forward(&self, batch: &PaddedBatch, mode: ForwardMode) -> Result<Tensor> {
        let (b, s) = (batch.rows, batch.seq_len);
        let cfg = &self.config;
        let pool = pool_positions(batch, cfg.pad_token_id)?;
        let ids = Tensor::from_slice(&batch.input_ids, (b * s,), &self.device)?;
        let mut xs = self
            .embed_tokens
            .index_select(&ids, 0)?
            .reshape((b, s, cfg.hidden_size))?;
        if cfg.norm == NormStyle::Gemma {
            // Gemma scales embeddings by sqrt(hidden), rounded to the weights' dtype.
            let scale = Tensor::new((cfg.hidden_size as f64).sqrt(), &self.device)?
                .to_dtype(self.dtype)?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
            xs = (xs * scale)?;
        }
        let (cos, sin) = self.rope_tables(s)?;
        // Scores are masked and normalised in f32 (f64 for an f64 model, as gradient checks need).
        let softmax_dtype = adapter_dtype(self.dtype);
        // The fused attention masks as it goes; the composed path needs the masks.
        let train = mode.training();
        let fused = self.fused_kernels(batch, train)?;
        let composed = fused.is_none();
        let full_mask = if composed {
            attention_mask(batch, None, &self.device)?.to_dtype(softmax_dtype)?
        } else {
            Tensor::zeros(1, softmax_dtype, &self.device)?
        };
        let sliding_mask = match &cfg.sliding_window {
            Some(w) if composed && self.layers.iter().any(|l| l.sliding) => {
                Some(attention_mask(batch, Some(w.size), &self.device)?.to_dtype(softmax_dtype)?)
            }
            _ => None,
        };
        for layer in &self.layers {
            let mask = match (&sliding_mask, layer.sliding) {
                (Some(m), true) => m,
                _ => &full_mask,
            };
            xs = self.layer_forward(layer, &xs, &cos, &sin, mask, train, fused.as_ref())?;
            crate::device::sample_memory(&self.device);
        }
        let xs = self.norm_any(&xs, &self.norm, train, fused.as_ref())?;
        let rows: Vec<u32> = pool
            .iter()
            .enumerate()
            .map(|(row, &pos)| (row * s + pos) as u32)
            .collect();
        let rows = Tensor::from_vec(rows, (b,), &self.device)?;
        let last = xs
            .reshape((b * s, cfg.hidden_size))?
            .index_select(&rows, 0)?;
        let head = self.score.weight.as_tensor();
        let head = if self.score.trainable && train {
            head.clone()
        } else {
            head.detach()
        };
        let logits = crate::lora::linear(&last.to_dtype(head.dtype())?, &head, None)?;
        Ok(logits)
    }

    /// The fused kernels' inputs for a batch, or None where candle's composed ops run:
    /// training, an f64/bf16 model on the CPU, rows whose real tokens are not one span on
    /// the CPU, or the kernels switched off (`ARENAFLOW_GPU_KERNELS` /
    /// `ARENAFLOW_CPU_KERNELS` = off). On a GPU, rows that are not one span are an error.
    fn fused_kernels(&self, batch: &PaddedBatch, train: bool) -> Result<Option<Fused>> {
        let gpu = self.device.is_cuda();
        let on = if gpu {
            cfg!(feature = "cuda") && crate::attention::kernels_enabled("ARENAFLOW_GPU_KERNELS")
        } else {
            self.device.is_cpu()
                && self.dtype == DType::F32
                && crate::attention::kernels_enabled("ARENAFLOW_CPU_KERNELS")
        };
        if train || !on {
            return Ok(None);
        }
        let s = batch.seq_len;
        let mut bounds = Vec::with_capacity(2 * batch.rows);
        for row in batch.attention_mask.chunks(s) {
            let start = row.iter().position(|&m| m != 0).unwrap_or(s);
            let end = row.iter().rposition(|&m| m != 0).map_or(start, |e| e + 1);
            if row[start..end].contains(&0) {
                if !gpu {
                    return Ok(None);
                }
                return Err(ModelError::Input(
                    "the GPU attention needs each row's real tokens in one span (left or right padding)".into(),
                ));
            }
            bounds.extend([start as u32, end as u32]);
        }
        let bounds = Tensor::from_vec(bounds, (batch.rows, 2), &self.device)?;
        Ok(Some(Fused { bounds, gpu }))
    }

    /// RMSNorm through the GPU kernel where it runs, else the composed ops.
    fn norm_any(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        train: bool,
        fused: Option<&Fused>,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if fused.is_some_and(|f| f.gpu) {
            return Ok(crate::kernels::rms_norm(
                xs,
                weight,
                self.config.rms_norm_eps as f32,
                self.config.norm == NormStyle::Gemma,
            )?);
        }
        let _ = fused;
        self.rms_norm(xs, weight, train)
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        layer: &Layer,
        xs: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        train: bool,
        fused: Option<&Fused>,
    ) -> Result<Tensor> {
        let dev = &self.device;
        let residual = xs;
        let h = profile::time(dev, "norms", || {
            self.norm_any(xs, &layer.input_norm, train, fused)
        })?;
        let h = match fused {
            Some(f) => self.fused_attention(layer, &h, cos, sin, f)?,
            None => self.attention(layer, &h, cos, sin, mask, train)?,
        };
        let h = match &layer.pre_feedforward_norm {
            // Gemma-2 normalises the attention output before the residual add.
            Some(_) => profile::time(dev, "norms", || {
                self.norm_any(&h, &layer.post_attention_norm, train, fused)
            })?,
            None => h,
        };
        let xs = profile::time(dev, "residual", || Ok((residual + h)?))?;
        let residual = &xs;
        let h = profile::time(dev, "norms", || match &layer.pre_feedforward_norm {
            Some(pre) => self.norm_any(&xs, pre, train, fused),
            None => self.norm_any(&xs, &layer.post_attention_norm, train, fused),
        })?;
        let (gate, up) = profile::time(dev, "mlp projections", || {
            Ok((layer.gate.forward(&h, train)?, layer.up.forward(&h, train)?))
        })?;
        let h = profile::time(dev, "activation", || {
            self.gated_activation(&gate, &up, fused)
        })?;
        let h = profile::time(dev, "mlp projections", || {
            Ok(layer.down.forward(&h, train)?)
        })?;
        let h = match &layer.post_feedforward_norm {
            Some(post) => profile::time(dev, "norms", || self.norm_any(&h, post, train, fused))?,
            None => h,
        };
        profile::time(dev, "residual", || Ok((residual + h)?))
    }

    fn gated_activation(
        &self,
        gate: &Tensor,
        up: &Tensor,
        fused: Option<&Fused>,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if fused.is_some_and(|f| f.gpu) {
            let kind = match self.config.activation {
                Activation::Silu => 0,
                Activation::GeluTanh => 1,
                Activation::GeluErf => 2,
            };
            return Ok(crate::kernels::gated(gate, up, kind)?);
        }
        let _ = fused;
        let gate = match self.config.activation {
            Activation::Silu => candle_nn::ops::silu(gate)?,
            Activation::GeluTanh => gate.gelu()?,
            Activation::GeluErf => gate.gelu_erf()?,
        };
        Ok((gate * up)?)
    }

    /// Attention through the fused op (arenaflow's GPU kernel, or the blocked CPU one): q,
    /// k, v stay (b, s, heads, d), RoPE in that layout, and the output comes back in it, so
    /// nothing is transposed and no mask is built.
    fn fused_attention(
        &self,
        layer: &Layer,
        xs: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        fused: &Fused,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (b, s, _) = xs.dims3()?;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let dev = &self.device;
        let (q, k, v) = profile::time(dev, "attention projections", || {
            Ok((
                layer.q.forward(xs, false)?.reshape((b, s, nh, hd))?,
                layer.k.forward(xs, false)?.reshape((b, s, nkv, hd))?,
                layer.v.forward(xs, false)?.reshape((b, s, nkv, hd))?,
            ))
        })?;
        let (q, k) = profile::time(dev, "rope", || {
            Ok((
                candle_nn::rotary_emb::rope_thd(&q.contiguous()?, cos, sin)?,
                candle_nn::rotary_emb::rope_thd(&k.contiguous()?, cos, sin)?,
            ))
        })?;
        let window = match (&cfg.sliding_window, layer.sliding) {
            (Some(w), true) => w.size as i32,
            _ => 0,
        };
        let out = profile::time(dev, "attention", || {
            Ok(crate::attention::attention(
                &q,
                &k,
                &v,
                crate::attention::Attention {
                    scale: cfg.query_scale as f32,
                    softcap: cfg.attn_logit_softcap.unwrap_or(0.0) as f32,
                    window,
                    bounds: fused.bounds.clone(),
                },
            )?)
        })?;
        profile::time(dev, "attention projections", || {
            Ok(layer.o.forward(&out.reshape((b, s, nh * hd))?, false)?)
        })
    }

    fn attention(
        &self,
        layer: &Layer,
        xs: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
        train: bool,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let (b, s, _) = xs.dims3()?;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let heads = |t: Tensor, n: usize| -> candle_core::Result<Tensor> {
            t.reshape((b, s, n, hd))?.transpose(1, 2)?.contiguous()
        };
        let dev = &self.device;
        let (q, k, v) = profile::time(dev, "attention projections", || {
            Ok((
                heads(layer.q.forward(xs, train)?, nh)?,
                heads(layer.k.forward(xs, train)?, nkv)?,
                heads(layer.v.forward(xs, train)?, nkv)?,
            ))
        })?;
        let (q, k) = profile::time(dev, "rope", || {
            Ok(if train {
                (
                    candle_nn::rotary_emb::rope_slow(&q, cos, sin)?,
                    candle_nn::rotary_emb::rope_slow(&k, cos, sin)?,
                )
            } else {
                (
                    candle_nn::rotary_emb::rope(&q, cos, sin)?,
                    candle_nn::rotary_emb::rope(&k, cos, sin)?,
                )
            })
        })?;
        let out = profile::time(dev, "attention", || {
            // Grouped-query attention without copying K and V: the query heads of one KV
            // head are stacked along the sequence axis.
            let group = nh / nkv;
            let q = q.reshape((b, nkv, group * s, hd))?;
            let scores = (q.matmul(&k.t()?)? * cfg.query_scale)?;
            let scores = match cfg.attn_logit_softcap {
                Some(cap) => ((scores / cap)?.tanh()? * cap)?,
                None => scores,
            };
            let scores = scores
                .reshape((b, nh, s, s))?
                .to_dtype(mask.dtype())?
                .broadcast_add(mask)?;
            let probs = if train {
                candle_nn::ops::softmax(&scores, D::Minus1)?
            } else {
                candle_nn::ops::softmax_last_dim(&scores)?
            };
            let probs = probs
                .to_dtype(self.dtype)?
                .reshape((b, nkv, group * s, s))?;
            let out = probs.matmul(&v)?;
            Ok(out
                .reshape((b, nh, s, hd))?
                .transpose(1, 2)?
                .reshape((b, s, nh * hd))?)
        })?;
        profile::time(dev, "attention projections", || {
            Ok(layer.o.forward(&out, train)?)
        })
    }

    /// RMSNorm in f32. Llama: weight times the normalised input cast back; Gemma: the
    /// normalised input times (1 + w) in f32, cast back. Gemma's stored weight is already
    /// 1 + w in f32.
    fn rms_norm(&self, xs: &Tensor, weight: &Tensor, train: bool) -> Result<Tensor> {
        let eps = self.config.rms_norm_eps;
        if !train && self.dtype == DType::F32 {
            return Ok(candle_nn::ops::rms_norm(xs, weight, eps as f32)?);
        }
        let internal = if self.dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let x = xs.to_dtype(internal)?;
        let variance = x.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x.broadcast_div(&(variance + eps)?.sqrt()?)?;
        Ok(match self.config.norm {
            NormStyle::Llama => normed.to_dtype(self.dtype)?.broadcast_mul(weight)?,
            NormStyle::Gemma => normed
                .broadcast_mul(&weight.to_dtype(internal)?)?
                .to_dtype(self.dtype)?,
        })
    }

    /// cos and sin of every position, as transformers computes them (f32), in the model dtype.
    fn rope_tables(&self, seq_len: usize) -> Result<(Tensor, Tensor)> {
        let inv_freq = inverse_frequencies(&self.config);
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(seq_len * half);
        let mut sin = Vec::with_capacity(seq_len * half);
        for pos in 0..seq_len {
            for f in &inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (seq_len, half), &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (seq_len, half), &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }
}

/// RoPE inverse frequencies in f32, with Llama-3.1's scaling, as transformers computes them.
pub fn inverse_frequencies(cfg: &DecoderConfig) -> Vec<f32> {
    let dim = cfg.head_dim;
    let base = cfg.rope.theta as f32;
    let default: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
        .collect();
    match cfg.rope.scaling {
        RopeScaling::None => default,
        RopeScaling::Linear { factor } => default.iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let (factor, low, high, old) = (
                factor as f32,
                low_freq_factor as f32,
                high_freq_factor as f32,
                original_max_position_embeddings as f32,
            );
            let low_freq_wavelen = old / low;
            let high_freq_wavelen = old / high;
            default
                .iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    let scaled = if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        f
                    };
                    let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                    if medium {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    }
                })
                .collect()
        }
    }
}

/// The position each row is pooled at: the rightmost token that is not `pad_token_id`
/// (position 0 when every token is padding), or the last position when there is no pad
/// token and the batch has one row; more rows with no pad token is an error, as in
/// transformers.
pub fn pool_positions(batch: &PaddedBatch, pad_token_id: Option<u32>) -> Result<Vec<usize>> {
    let s = batch.seq_len;
    match pad_token_id {
        None if batch.rows == 1 => Ok(vec![s - 1]),
        None => Err(ModelError::Config(
            "config.json has no pad_token_id, so rows of a batch cannot be told from their padding; set pad_token_id".into(),
        )),
        Some(pad) => Ok(batch
            .input_ids
            .chunks(s)
            .map(|row| row.iter().rposition(|&t| t != pad).unwrap_or(0))
            .collect()),
    }
}

/// The additive attention mask (rows x 1 x s x s, f32): a query sees a key at or before it,
/// that is not padding, and, with a window, fewer than `window` positions back. A query with
/// nothing to see (left padding) gets a uniform row, as transformers' finite minimum gives.
fn attention_mask(batch: &PaddedBatch, window: Option<usize>, device: &Device) -> Result<Tensor> {
    let (b, s) = (batch.rows, batch.seq_len);
    let mut mask = vec![f32::MIN; b * s * s];
    for row in 0..b {
        let keys = &batch.attention_mask[row * s..(row + 1) * s];
        for q in 0..s {
            let first = match window {
                Some(w) => (q + 1).saturating_sub(w),
                None => 0,
            };
            let out = &mut mask[(row * s + q) * s..(row * s + q + 1) * s];
            for k in first..=q {
                if keys[k] != 0 {
                    out[k] = 0.0;
                }
            }
        }
    }
    Ok(Tensor::from_vec(mask, (b, 1, s, s), device)?)
}

fn norm_weight(
    loader: &mut WeightLoader,
    name: &str,
    h: usize,
    style: NormStyle,
) -> Result<Tensor> {
    match style {
        NormStyle::Llama => loader.tensor(name, &[h]),
        // Kept as 1 + w in f32, the form Gemma multiplies by.
        NormStyle::Gemma => {
            let internal = adapter_dtype(loader.dtype);
            Ok((loader.tensor_as(name, &[h], internal)? + 1.0)?)
        }
    }
}

fn stored_norm_weight(w: &Tensor, style: NormStyle, dtype: DType) -> candle_core::Result<Tensor> {
    match style {
        NormStyle::Llama => Ok(w.clone()),
        NormStyle::Gemma => (w - 1.0)?.to_dtype(dtype),
    }
}
