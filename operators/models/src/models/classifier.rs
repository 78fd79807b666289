//! The 3-class sequence classifier over the decoder stack shared by the three families, with
//! the score head on the last non-pad token. Llama and Qwen2 run the same block (Qwen2 with
//! q/k/v biases); Gemma-2 adds the sandwich norms, the embedding scale, the soft-capped
//! attention logits and the sliding window, all switched by [`DecoderConfig`].
//!
//! The pass is exposed piece by piece so that training (checkpointing) and quantization can
//! run it layer by layer: [`SequenceClassifier::batch_state`], [`SequenceClassifier::embed`],
//! each of [`SequenceClassifier::layers`], then [`SequenceClassifier::head`];
//! [`SequenceClassifier::forward_t`] is exactly that sequence.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};

use super::batch::PaddedBatch;
use super::{adapter_dtype, CheckpointHead, DecoderConfig, ModelConfig, NormStyle};
use crate::error::{ModelError, Result};
use crate::layers::decoder_layer::DecoderLayer;
use crate::layers::linear::linear;
use crate::layers::rms_norm::RmsNorm;
use crate::layers::rope::Rope;
use crate::layers::{BatchState, Kernels};
use crate::lora::{LoraConfig, LoraWeights, Projection};
use crate::weights::{SplitMix64, TensorSource, WeightLoader, Weights};

/// The classifier head: hidden -> num_labels, no bias, kept in f32 (or f64) as a variable
/// so that it can be trained or saved with an adapter.
#[derive(Debug, Clone)]
pub struct ScoreHead {
    pub weight: Var,
    pub trainable: bool,
}

/// A Llama / Qwen2 / Gemma-2 sequence classifier with optional LoRA adapters.
#[derive(Debug, Clone)]
pub struct SequenceClassifier {
    pub config: DecoderConfig,
    /// config.json as loaded, written back with a merged model.
    pub raw_config: serde_json::Value,
    embed_tokens: Tensor,
    pub(crate) layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    rope: Rope,
    pub score: ScoreHead,
    pub lora: Option<LoraConfig>,
    kernels: Kernels,
    dtype: DType,
    device: Device,
}

const PEFT_PREFIX: &str = "base_model.model";
const SCORE: &str = "score.weight";

/// Where the score head comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadInit {
    /// The adapter's saved head, else the checkpoint's (an error where neither has one).
    Checkpoint,
    /// A new head as transformers initialises one (normal, std `initializer_range`),
    /// drawn from `seed`; a head in the checkpoint or the adapter is ignored.
    Fresh { seed: u64 },
}

impl SequenceClassifier {
    /// Loads a classifier from a checkpoint's tensors and, optionally, a PEFT LoRA adapter's.
    /// All or nothing: every tensor named by the config must be present, and nothing else.
    /// The kernels (fused or composed) are chosen here, once, for the device and dtype.
    pub fn load(
        config: &ModelConfig,
        base: &TensorSource,
        adapter: Option<(&LoraConfig, &TensorSource)>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::load_with_head(config, base, adapter, dtype, device, HeadInit::Checkpoint)
    }

    /// [`Self::load`] with the score head from `head`.
    pub fn load_with_head(
        config: &ModelConfig,
        base: &TensorSource,
        adapter: Option<(&LoraConfig, &TensorSource)>,
        dtype: DType,
        device: &Device,
        head: HeadInit,
    ) -> Result<Self> {
        let cfg = &config.decoder;
        let kernels = Kernels::resolve(device, dtype);
        let loader = WeightLoader::new(base, dtype, device).with_gptq(config.gptq);
        let adapter_loader = adapter.map(|(lora, source)| {
            (
                lora,
                WeightLoader::new(source, adapter_dtype(dtype), device),
            )
        });
        let head_dtype = adapter_dtype(dtype);
        let vb = loader.root();
        let h = cfg.hidden_size;

        let model_vb = vb.pp("model");
        let embed_tokens = model_vb
            .pp("embed_tokens")
            .get("weight", &[cfg.vocab_size, h])?;
        let layers_vb = model_vb.pp("layers");
        let layers = (0..cfg.num_layers)
            .map(|i| DecoderLayer::new(cfg, &layers_vb.pp(i), i, kernels))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(cfg, &model_vb.pp("norm"), kernels)?;

        // The score head: the adapter's trained copy (PEFT `modules_to_save`) replaces the
        // base's; a causal-LM checkpoint has none and must get one from an adapter.
        let adapter_has_score = adapter.is_some_and(|(lora, _)| lora.saves_score_head());
        let score_weight = match (&adapter_loader, head) {
            (_, HeadInit::Fresh { seed }) => {
                vb.drop_if_present(SCORE);
                if let Some((_, a)) = &adapter_loader {
                    if adapter_has_score {
                        a.root().pp(PEFT_PREFIX).drop_if_present(SCORE);
                    }
                }
                let std = config
                    .raw
                    .get("initializer_range")
                    .and_then(|v| v.as_f64())
                    .unwrap_or(0.02);
                let mut rng = SplitMix64::new(seed);
                let values: Vec<f64> = (0..3 * h).map(|_| std * rng.next_normal()).collect();
                Tensor::from_vec(values, (3, h), device)?.to_dtype(head_dtype)?
            }
            (Some((_, a)), HeadInit::Checkpoint) if adapter_has_score => {
                vb.drop_if_present(SCORE);
                a.root()
                    .pp(PEFT_PREFIX)
                    .get_as(SCORE, &[3, h], head_dtype)?
            }
            (_, HeadInit::Checkpoint) => {
                if config.head != CheckpointHead::Classifier && !vb.contains(SCORE) {
                    return Err(ModelError::Config(format!(
                        "{}: no `{SCORE}`: the checkpoint is a {} without a classifier head; load it \
                         with a PEFT adapter that saved the score head (modules_to_save = [\"score\"])",
                        base.label(),
                        if config.head == CheckpointHead::CausalLm { "causal LM" } else { "bare decoder" },
                    )));
                }
                vb.get_as(SCORE, &[3, h], head_dtype)?
            }
        };
        if config.head == CheckpointHead::CausalLm {
            vb.drop_if_present("lm_head.weight");
        }

        let mut model = Self {
            config: cfg.clone(),
            raw_config: config.raw.clone(),
            embed_tokens,
            layers,
            norm,
            rope: Rope::new(cfg),
            score: ScoreHead {
                weight: Var::from_tensor(&score_weight)?,
                trainable: adapter_has_score || matches!(head, HeadInit::Fresh { .. }),
            },
            lora: None,
            kernels,
            dtype,
            device: device.clone(),
        };

        if let Some((lora, a)) = adapter_loader {
            model.attach_adapter(lora, &a.root().pp(PEFT_PREFIX))?;
            a.finish()?;
            model.lora = Some(lora.clone());
        }
        loader.finish()?;
        Ok(model)
    }

    /// Every targeted projection's `lora_A` and `lora_B` from `adapter` (under PEFT's prefix).
    fn attach_adapter(&mut self, lora: &LoraConfig, adapter: &Weights) -> Result<()> {
        let scaling = lora.scaling();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for p in Projection::ALL {
                if !lora.targets(p, i)? {
                    continue;
                }
                let (out, inp) = layer.projection(p).weight.dims()?;
                let module = adapter.pp(p.path(i));
                let a = module.get("lora_A.weight", &[lora.r, inp])?;
                let b = module.get("lora_B.weight", &[out, lora.r])?;
                layer.projection_mut(p).lora = Some(LoraWeights {
                    a: Var::from_tensor(&a)?,
                    b: Var::from_tensor(&b)?,
                    scaling,
                    dropout: lora.lora_dropout,
                    autocast: false,
                });
            }
        }
        Ok(())
    }

    /// Adds fresh adapters as PEFT initialises them (A Kaiming-uniform, B zero) and makes the
    /// score head trainable when `lora` saves it.
    pub fn init_lora(&mut self, lora: &LoraConfig, seed: u64) -> Result<()> {
        lora.validate()?;
        let dtype = adapter_dtype(self.dtype);
        let mut rng = SplitMix64::new(seed);
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for p in Projection::ALL {
                if !lora.targets(p, i)? {
                    continue;
                }
                let (out, inp) = layer.projection(p).weight.dims()?;
                let bound = 1.0 / (inp as f64).sqrt();
                let a: Vec<f64> = (0..lora.r * inp)
                    .map(|_| (2.0 * rng.next_uniform() - 1.0) * bound)
                    .collect();
                let a = Tensor::from_vec(a, (lora.r, inp), &self.device)?.to_dtype(dtype)?;
                let b = Tensor::zeros((out, lora.r), dtype, &self.device)?;
                layer.projection_mut(p).lora = Some(LoraWeights {
                    a: Var::from_tensor(&a)?,
                    b: Var::from_tensor(&b)?,
                    scaling: lora.scaling(),
                    dropout: lora.lora_dropout,
                    autocast: false,
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

    /// Sets every adapter's dropout (and the config's `lora_dropout`, saved with it).
    pub fn set_lora_dropout(&mut self, p: f64) -> Result<()> {
        if !(0.0..1.0).contains(&p) {
            return Err(ModelError::Config(format!(
                "lora_dropout {p} is not in [0, 1)"
            )));
        }
        for layer in &mut self.layers {
            for proj in Projection::ALL {
                if let Some(lora) = &mut layer.projection_mut(proj).lora {
                    lora.dropout = p;
                }
            }
        }
        if let Some(lora) = &mut self.lora {
            lora.lora_dropout = p;
        }
        Ok(())
    }

    /// Runs every adapter's matmuls in the model's dtype (`true`, as `torch.autocast`) or in
    /// the adapter's f32 (`false`, PEFT's default): see [`LoraWeights::autocast`].
    pub fn set_lora_autocast(&mut self, on: bool) {
        for layer in &mut self.layers {
            for proj in Projection::ALL {
                if let Some(lora) = &mut layer.projection_mut(proj).lora {
                    lora.autocast = on;
                }
            }
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The kernels chosen at load.
    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// The token that pads rows; transformers pools on the last token that is not it.
    /// Decoder layer `index`, to change (e.g. its projections' weights).
    pub fn layer_mut(&mut self, index: usize) -> &mut DecoderLayer {
        &mut self.layers[index]
    }

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
                    let path = format!("{PEFT_PREFIX}.{}", p.path(i));
                    vars.push((format!("{path}.lora_A.weight"), lora.a.clone()));
                    vars.push((format!("{path}.lora_B.weight"), lora.b.clone()));
                }
            }
        }
        if self.score.trainable {
            vars.push((format!("{PEFT_PREFIX}.{SCORE}"), self.score.weight.clone()));
        }
        vars
    }

    /// Folds every adapter into its projection's weight (W + scaling * B A, rounded once to
    /// the model's dtype, as PEFT's `merge_and_unload`) and drops it: an inference model that
    /// runs at the base model's cost. Training needs the adapters kept.
    pub fn merge_adapters(&mut self) -> Result<()> {
        for layer in &mut self.layers {
            for p in Projection::ALL {
                let linear = layer.projection_mut(p);
                if linear.lora.is_some() {
                    let merged = linear.merged_weight()?;
                    linear.weight = crate::layers::linear::LinearWeight::Dense(merged);
                    linear.lora = None;
                }
            }
        }
        // No adapter is left to save: save_adapter refuses instead of writing a config
        // without its LoRA tensors.
        self.lora = None;
        Ok(())
    }

    /// Every weight by its Hugging Face name, with the adapters folded in: the tensors of a
    /// merged `*ForSequenceClassification` checkpoint.
    pub fn merged_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        self.checkpoint_tensors(&|_, linear| Ok(linear.merged_weight()?))
    }

    /// A merged checkpoint's tensors, each projection's weight given by `projection`
    /// (its PEFT path and the layer).
    fn checkpoint_tensors(
        &self,
        projection: &dyn Fn(&str, &crate::layers::linear::Linear) -> Result<Tensor>,
    ) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        out.insert(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.clone(),
        );
        for (i, layer) in self.layers.iter().enumerate() {
            for p in Projection::ALL {
                let linear = layer.projection(p);
                let path = format!("{PEFT_PREFIX}.{}", p.path(i));
                out.insert(format!("{}.weight", p.path(i)), projection(&path, linear)?);
                if let Some(bias) = &linear.bias {
                    out.insert(format!("{}.bias", p.path(i)), bias.clone());
                }
            }
            for (name, norm) in layer.norms() {
                out.insert(
                    format!("model.layers.{i}.{name}.weight"),
                    norm.stored_weight()?,
                );
            }
        }
        out.insert("model.norm.weight".to_string(), self.norm.stored_weight()?);
        out.insert(
            SCORE.to_string(),
            self.score.weight.as_tensor().to_dtype(self.dtype)?,
        );
        Ok(out)
    }

    /// The tensors of a merged checkpoint whose every adapted projection is
    /// W + Σ_f w_f · scaling · B_f A_f, with fold f's `lora_A`/`lora_B` under PEFT's names in
    /// `folds`, and whose score head is Σ_f w_f score_f: the exact weighted mean of the
    /// folds' merged models (weights summing to 1), which a mean of A and of B is not.
    pub fn merged_mean_tensors(
        &self,
        folds: &[(f64, &BTreeMap<String, Tensor>)],
    ) -> Result<BTreeMap<String, Tensor>> {
        let get = |tensors: &BTreeMap<String, Tensor>, name: &str| -> Result<Tensor> {
            tensors
                .get(name)
                .map(|t| t.to_dtype(DType::F32))
                .transpose()?
                .ok_or_else(|| ModelError::Input(format!("a fold's adapter has no tensor {name}")))
        };
        let mut out = self.checkpoint_tensors(&|path, linear| {
            let weight = linear.weight.dense()?;
            let Some(lora) = &linear.lora else {
                return Ok(weight);
            };
            let mut merged = weight.to_dtype(DType::F32)?;
            for (w, tensors) in folds {
                let a =
                    get(tensors, &format!("{path}.lora_A.weight"))?.to_device(weight.device())?;
                let b =
                    get(tensors, &format!("{path}.lora_B.weight"))?.to_device(weight.device())?;
                merged = (merged + (b.matmul(&a)? * (lora.scaling * w))?)?;
            }
            Ok(merged.to_dtype(weight.dtype())?)
        })?;
        let head = format!("{PEFT_PREFIX}.{SCORE}");
        if folds.iter().all(|(_, t)| t.contains_key(&head)) {
            let mut score: Option<Tensor> = None;
            for (w, tensors) in folds {
                let term = (get(tensors, &head)? * *w)?;
                score = Some(match score {
                    None => term,
                    Some(s) => (s + term)?,
                });
            }
            if let Some(score) = score {
                out.insert(SCORE.to_string(), score.to_dtype(self.dtype)?);
            }
        }
        Ok(out)
    }

    /// What the layers and the head need of `batch`: rope tables, the padding (as row spans
    /// where the fused attention runs, as masks otherwise) and each row's pooled position.
    pub fn batch_state(&self, batch: &PaddedBatch, train: bool) -> Result<BatchState> {
        BatchState::new(
            &self.config,
            &self.rope,
            self.kernels,
            batch,
            train,
            self.dtype,
            &self.device,
        )
    }

    /// The token embeddings of `batch`, (rows, seq_len, hidden); Gemma scales them by
    /// sqrt(hidden), rounded to the weights' dtype.
    pub fn embed(&self, batch: &PaddedBatch) -> Result<Tensor> {
        let (b, s) = (batch.rows, batch.seq_len);
        let ids = Tensor::from_slice(&batch.input_ids, (b * s,), &self.device)?;
        let xs =
            self.embed_tokens
                .index_select(&ids, 0)?
                .reshape((b, s, self.config.hidden_size))?;
        if self.config.norm != NormStyle::Gemma {
            return Ok(xs);
        }
        let scale = Tensor::new((self.config.hidden_size as f64).sqrt(), &self.device)?
            .to_dtype(self.dtype)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        Ok((xs * scale)?)
    }

    /// The decoder layers, in order; each runs on its own with the batch's state.
    pub fn layers(&self) -> &[DecoderLayer] {
        &self.layers
    }

    /// The final norm and the score head on each row's last token that is not the pad
    /// token (transformers' rule, which handles left and right padding alike): the 3
    /// logits per row, in f32 (f64 for an f64 model).
    pub fn head(&self, xs: &Tensor, state: &BatchState, train: bool) -> Result<Tensor> {
        let xs = self.norm.forward_t(xs, train)?;
        self.score_normed(&xs, state, train)
    }

    /// [`Self::head`] after the final norm.
    fn score_normed(&self, xs: &Tensor, state: &BatchState, train: bool) -> Result<Tensor> {
        let (b, s) = (state.rows, state.seq_len);
        let rows: Vec<u32> = state
            .pool
            .iter()
            .enumerate()
            .map(|(row, &pos)| (row * s + pos) as u32)
            .collect();
        let rows = Tensor::from_vec(rows, (b,), &self.device)?;
        let last = xs
            .reshape((b * s, self.config.hidden_size))?
            .index_select(&rows, 0)?;
        let head = self.score.weight.as_tensor();
        let head = if self.score.trainable && train {
            head.clone()
        } else {
            head.detach()
        };
        Ok(linear(&last.to_dtype(head.dtype())?, &head, None)?)
    }

    /// The 3 logits of every row: embed, every layer, head. `train` runs dropout and the
    /// differentiable (composed) ops.
    pub fn forward_t(&self, batch: &PaddedBatch, train: bool) -> Result<Tensor> {
        let state = self.batch_state(batch, train)?;
        let mut xs = self.embed(batch)?;
        // Each layer's last residual add runs with the next norm (the next layer's input
        // norm, then the final one): `DecoderLayer::forward_pending`.
        let mut pending: Option<Tensor> = None;
        for layer in &self.layers {
            let (residual, h) = layer.forward_pending(&xs, pending.as_ref(), &state, train)?;
            (xs, pending) = (residual, Some(h));
            crate::device::sample_memory(&self.device);
        }
        let normed = match &pending {
            Some(h) => self.norm.add_forward_t(&xs, h, train)?.1,
            None => self.norm.forward_t(&xs, train)?,
        };
        self.score_normed(&normed, &state, train)
    }
}
