//! The training loop: the data order of every epoch, steps of `batch_rows` rows (both
//! orders of an id together), micro-batches under `max_batch_tokens` whose gradients sum to
//! the step's, per-layer recomputation when checkpointing, clipping, AdamW, evaluation.
//! With data-parallel ranks each takes its share of a step's rows and the ranks sum their
//! gradients before the optimizer step ([`super::collective`]).

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Tensor, Var};

use super::collective::{Collective, Single};
use super::info_gain::InfoGain;
use super::loss::{distill_loss, LossTerms};
use super::optim::AdamW;
use super::{EvalMetrics, Event, Keep, StepMetrics, TrainConfig, TrainRow};
use crate::error::{ModelError, Result};
use crate::layers::dropout;
use crate::models::{PaddedBatch, SequenceClassifier};
use crate::weights::SplitMix64;

/// One planned optimizer step: the training rows it takes.
#[derive(Debug, Clone)]
struct PlannedStep {
    rows: Vec<usize>,
    /// Epochs done at the end of this step (fractional).
    epoch_progress: f64,
}

/// The best evaluation so far and the trainable tensors it was made with.
#[derive(Debug, Clone)]
pub(super) struct Best {
    pub log_loss: f64,
    pub step: usize,
    pub tensors: Vec<Tensor>,
}

/// The gradient of one step: the loss terms, each variable's gradient (in
/// [`Trainer::named_vars`] order), the rows' logits, and what went into it.
#[derive(Debug)]
pub struct StepGradients {
    pub terms: LossTerms,
    pub grads: Vec<Tensor>,
    pub logits: Vec<[f32; 3]>,
    pub tokens: usize,
    pub micro_batches: usize,
    pub forward_seconds: f64,
    pub backward_seconds: f64,
}

/// Trains a classifier's adapters and score head over a set of rows.
pub struct Trainer {
    pub model: SequenceClassifier,
    pub config: TrainConfig,
    pub(super) names: Vec<String>,
    pub(super) vars: Vec<Var>,
    pub(super) optimizer: AdamW,
    train: Vec<TrainRow>,
    dev: Vec<TrainRow>,
    plan: Vec<PlannedStep>,
    warmup: usize,
    teachers: usize,
    /// The next step to take (0-based): steps before it are done.
    pub(super) next_step: usize,
    pub(super) info_gain: Option<InfoGain>,
    pub(super) best: Option<Best>,
    /// Every event so far (a resumed run reports the earlier ones too).
    pub(super) events: Vec<Event>,
    /// The data-parallel ranks this trainer is one of ([`Single`]: alone).
    collective: std::sync::Mutex<Box<dyn Collective>>,
}

impl Trainer {
    /// A trainer over `rows` for `model`, whose trainable variables (adapters, and the score
    /// head when trained) are what the optimiser updates.
    pub fn new(
        model: SequenceClassifier,
        config: TrainConfig,
        rows: Vec<TrainRow>,
    ) -> Result<Self> {
        config.validate()?;
        let (names, vars): (Vec<String>, Vec<Var>) = model.trainable_vars().into_iter().unzip();
        if vars.is_empty() {
            return Err(ModelError::Input(
                "the model has nothing to train (no adapter and no trainable score head)".into(),
            ));
        }
        if model.pad_token_id().is_none() {
            return Err(ModelError::Config(
                "the model names no pad token (pad_token_id): batches cannot be padded".into(),
            ));
        }
        let teachers = rows.first().map_or(0, |r| r.teachers.len());
        for row in &rows {
            if row.label > 2 {
                return Err(ModelError::Input(format!(
                    "row id {} order {}: label {} is not 0, 1 or 2",
                    row.id, row.order, row.label
                )));
            }
            if row.teachers.len() != teachers {
                return Err(ModelError::Input(format!(
                    "row id {} order {}: {} teacher logit sets where the first row has {teachers}",
                    row.id,
                    row.order,
                    row.teachers.len()
                )));
            }
            if row.input_ids.is_empty() {
                return Err(ModelError::Input(format!(
                    "row id {} order {}: no tokens",
                    row.id, row.order
                )));
            }
            if !(row.weight.is_finite() && row.weight >= 0.0) {
                return Err(ModelError::Input(format!(
                    "row id {} order {}: weight {} is not a finite number >= 0",
                    row.id, row.order, row.weight
                )));
            }
        }
        let (dev, train): (Vec<TrainRow>, Vec<TrainRow>) = rows.into_iter().partition(|r| r.dev);
        if train.is_empty() {
            return Err(ModelError::Input(
                "no training rows (every row is dev)".into(),
            ));
        }
        let info_gain = match &config.info_gain {
            Some(ig) if teachers == 0 => {
                let _ = ig;
                return Err(ModelError::Config(
                    "information-gain weights need teacher logits (no teacher columns)".into(),
                ));
            }
            Some(ig) => Some(InfoGain::new(*ig, train.iter().map(|r| r.label))?),
            None => None,
        };
        let plan = plan_steps(&train, &config);
        let warmup = config
            .warmup_steps
            .unwrap_or_else(|| (config.warmup_ratio * plan.len() as f64).ceil() as usize);
        let optimizer = AdamW::new(config.optimizer, &vars)?;
        Ok(Self {
            model,
            config,
            names,
            vars,
            optimizer,
            train,
            dev,
            plan,
            warmup,
            teachers,
            next_step: 0,
            info_gain,
            best: None,
            events: Vec::new(),
            collective: std::sync::Mutex::new(Box::new(Single)),
        })
    }

    /// This trainer as one rank of a data-parallel run: every step it computes the
    /// gradient of its share of the step's rows (every world-th row by length, from its
    /// rank on) and sums it with the other ranks' through `collective`, so that every rank
    /// takes the step one process over all the rows would. The ranks must be given the same
    /// rows and configuration. With dropout the masks differ from one process's (they are
    /// drawn per micro-batch); without, the adapters agree within float rounding.
    pub fn with_collective(mut self, collective: Box<dyn Collective>) -> Self {
        self.collective = std::sync::Mutex::new(collective);
        self
    }

    /// (rank, world) of this trainer's data-parallel run.
    pub fn rank(&self) -> (usize, usize) {
        let c = self.collective.lock().expect("the collective's lock");
        (c.rank(), c.world())
    }

    pub fn total_steps(&self) -> usize {
        self.plan.len()
    }

    /// Steps done so far.
    pub fn steps_done(&self) -> usize {
        self.next_step
    }

    pub fn warmup_steps(&self) -> usize {
        self.warmup
    }

    pub fn teachers(&self) -> usize {
        self.teachers
    }

    pub fn train_rows(&self) -> usize {
        self.train.len()
    }

    pub fn dev_rows(&self) -> usize {
        self.dev.len()
    }

    /// A fingerprint of the rows (train and dev, in order), kept in checkpoints.
    pub(super) fn rows_hash(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut feed = |bytes: &[u8]| {
            for b in bytes {
                h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
            }
        };
        for r in self.train.iter().chain(&self.dev) {
            feed(r.id.as_bytes());
            feed(&[0]);
            feed(r.order.as_bytes());
            feed(&[0]);
            for t in &r.input_ids {
                feed(&t.to_le_bytes());
            }
            feed(&r.label.to_le_bytes());
            feed(&r.weight.to_le_bytes());
            for z in r.teachers.iter().flatten() {
                feed(&z.to_le_bytes());
            }
            feed(&[u8::from(r.dev)]);
        }
        format!("{h:016x}")
    }

    /// The events so far.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// The trainable variables by their PEFT names.
    pub fn named_vars(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.names.iter().map(|n| n.as_str()).zip(&self.vars)
    }

    /// Runs the remaining steps, evaluating every `eval_every` steps and after the last
    /// (with `eval_every`, also before the first step: the untrained model's dev log loss,
    /// the baseline, never kept by `keep = best`); `on_event` sees each event after it
    /// happened (to report it or write a checkpoint).
    pub fn run(&mut self, on_event: &mut dyn FnMut(&Trainer, &Event) -> Result<()>) -> Result<()> {
        if self.next_step == 0 && !self.dev.is_empty() && self.config.eval_every.is_some() {
            let eval = Event::Eval(self.evaluate()?);
            self.events.push(eval.clone());
            on_event(self, &eval)?;
        }
        while self.next_step < self.plan.len() {
            let metrics = self.step()?;
            let step = metrics.step;
            let event = Event::Step(metrics);
            self.events.push(event.clone());
            let last = step == self.plan.len();
            let evaluate = !self.dev.is_empty()
                && (last || self.config.eval_every.is_some_and(|n| step % n == 0));
            if evaluate {
                let eval = Event::Eval(self.evaluate()?);
                self.events.push(eval.clone());
                on_event(self, &event)?;
                on_event(self, &eval)?;
            } else {
                on_event(self, &event)?;
            }
        }
        Ok(())
    }

    /// The model the run ends with: the last step's, or the best evaluation's (`keep = best`).
    pub fn finish(self) -> Result<(SequenceClassifier, Option<(usize, f64)>)> {
        let chosen = match (&self.config.keep, &self.best) {
            (Keep::Best, Some(best)) => {
                for (var, t) in self.vars.iter().zip(&best.tensors) {
                    var.set(t)?;
                }
                Some((best.step, best.log_loss))
            }
            _ => None,
        };
        Ok((self.model, chosen))
    }

    /// Takes the next optimizer step.
    pub fn step(&mut self) -> Result<StepMetrics> {
        let started = Instant::now();
        let index = self.next_step;
        let planned = self.plan[index].clone();
        let rows: Vec<&TrainRow> = planned.rows.iter().map(|&i| &self.train[i]).collect();
        let gradients = self.gradients()?;
        let optimizer_started = Instant::now();
        let mut grads = gradients.grads;
        let lr = self.config.lr
            * self
                .config
                .schedule
                .multiplier(index, self.warmup, self.plan.len());
        let grad_norm =
            self.optimizer
                .step_clipped(&self.vars, &mut grads, lr, self.config.max_grad_norm)?;
        if let Some(ig) = &mut self.info_gain {
            let labels: Vec<u32> = rows.iter().map(|r| r.label).collect();
            ig.update(&labels, &gradients.logits);
        }
        self.next_step += 1;
        // The optimizer's work is queued on a GPU: wait for it, so the shares are true.
        self.vars[0].as_tensor().device().synchronize()?;
        Ok(StepMetrics {
            step: index + 1,
            epoch: planned.epoch_progress,
            lr,
            terms: gradients.terms,
            grad_norm,
            rows: rows.len(),
            tokens: gradients.tokens,
            micro_batches: gradients.micro_batches,
            seconds: started.elapsed().as_secs_f64(),
            forward_seconds: gradients.forward_seconds,
            backward_seconds: gradients.backward_seconds,
            optimizer_seconds: optimizer_started.elapsed().as_secs_f64(),
        })
    }

    /// The gradient of the next step's loss (the weighted mean over its rows) with respect
    /// to every trainable variable, summed over the step's micro-batches; nothing changes.
    pub fn gradients(&self) -> Result<StepGradients> {
        let index = self.next_step;
        let planned = self.plan[index].clone();
        let rows: Vec<&TrainRow> = planned.rows.iter().map(|&i| &self.train[i]).collect();
        let weights: Vec<f64> = rows
            .iter()
            .map(|r| {
                r.weight
                    * self
                        .info_gain
                        .as_ref()
                        .map_or(1.0, |ig| ig.weight(r.label, &r.teachers))
            })
            .collect();
        let total_weight: f64 = weights.iter().sum();
        if total_weight <= 0.0 {
            return Err(ModelError::Input(format!(
                "step {}: the rows' weights sum to 0",
                index + 1
            )));
        }
        let mut grads: Vec<Option<Tensor>> = vec![None; self.vars.len()];
        let mut terms = LossTerms::default();
        let mut tokens = 0;
        let (rank, world) = self.rank();
        // This rank's rows of the step (all of them alone), as indices into `rows`.
        let share: Vec<usize> = if world == 1 {
            (0..rows.len()).collect()
        } else {
            longest_first(&rows)
                .into_iter()
                .skip(rank)
                .step_by(world)
                .collect()
        };
        let share_rows: Vec<&TrainRow> = share.iter().map(|&i| rows[i]).collect();
        let micro: Vec<Vec<usize>> = micro_batches(&share_rows, self.config.max_batch_tokens)
            .into_iter()
            .map(|m| m.into_iter().map(|j| share[j]).collect())
            .collect();
        let mut student_logits = vec![[0f32; 3]; rows.len()];
        let (mut forward_seconds, mut backward_seconds) = (0.0, 0.0);
        for (m, members) in micro.iter().enumerate() {
            let key = if world == 1 {
                dropout::key(&[self.config.seed, index as u64, m as u64])
            } else {
                dropout::key(&[self.config.seed, index as u64, rank as u64, m as u64])
            };
            let scales: Vec<f64> = members.iter().map(|&i| weights[i] / total_weight).collect();
            let part: Vec<&TrainRow> = members.iter().map(|&i| rows[i]).collect();
            tokens += part.iter().map(|r| r.input_ids.len()).sum::<usize>();
            let (t, g, logits, times) = self.micro_batch(&part, &scales, key)?;
            forward_seconds += times.0;
            backward_seconds += times.1;
            terms.add(&t);
            for (slot, new) in grads.iter_mut().zip(g) {
                *slot = match (slot.take(), new) {
                    (Some(a), Some(b)) => Some((a + b)?),
                    (a, b) => a.or(b),
                };
            }
            for (&i, z) in members.iter().zip(logits) {
                student_logits[i] = z;
            }
        }
        let mut grads: Vec<Tensor> = grads
            .into_iter()
            .zip(&self.vars)
            .map(|(g, v)| g.map_or_else(|| v.as_tensor().zeros_like(), Ok))
            .collect::<candle_core::Result<_>>()?;
        let mut micro_batches = micro.len();
        if world > 1 {
            let mut counts = [tokens as f64, micro_batches as f64];
            self.all_reduce(&mut grads, &mut terms, &mut student_logits, &mut counts)?;
            (tokens, micro_batches) = (counts[0] as usize, counts[1] as usize);
        }
        Ok(StepGradients {
            terms,
            grads,
            logits: student_logits,
            tokens,
            micro_batches,
            forward_seconds,
            backward_seconds,
        })
    }

    /// Sums a step's gradients, loss terms, row logits (each row's from the one rank that
    /// computed it, zeros elsewhere) and `counts` over the data-parallel ranks: the
    /// gradients on their devices where the collective can (NCCL), the rest (and the
    /// gradients otherwise) in one exchange through the host.
    fn all_reduce(
        &self,
        grads: &mut [Tensor],
        terms: &mut LossTerms,
        logits: &mut [[f32; 3]],
        counts: &mut [f64],
    ) -> Result<()> {
        let teachers = self.teachers;
        terms.kl.resize(teachers, 0.0);
        terms.cos.resize(teachers, 0.0);
        let mut collective = self
            .collective
            .lock()
            .map_err(|_| ModelError::Input("the collective's lock is poisoned".into()))?;
        let on_device = collective.all_reduce_tensors(grads)?;
        let mut flat: Vec<f64> = Vec::new();
        if !on_device {
            for g in grads.iter() {
                flat.extend(g.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?);
            }
        }
        let scalars = flat.len();
        flat.push(terms.loss);
        flat.push(terms.ce);
        flat.extend(&terms.kl);
        flat.extend(&terms.cos);
        flat.extend(logits.iter().flatten().map(|&z| z as f64));
        flat.extend(counts.iter());
        collective.all_reduce_sum(&mut flat)?;
        let mut at = 0;
        if !on_device {
            for g in grads.iter_mut() {
                let n = g.elem_count();
                let summed = Tensor::from_slice(&flat[at..at + n], g.shape(), g.device())?;
                *g = summed.to_dtype(g.dtype())?;
                at += n;
            }
        }
        debug_assert_eq!(at, scalars);
        let mut rest = flat[at..].iter().copied();
        let mut next = || rest.next().expect("the reduced buffer holds every part");
        terms.loss = next();
        terms.ce = next();
        for t in terms.kl.iter_mut().chain(terms.cos.iter_mut()) {
            *t = next();
        }
        for z in logits.iter_mut().flatten() {
            *z = next() as f32;
        }
        for c in counts.iter_mut() {
            *c = next();
        }
        Ok(())
    }

    /// Loss terms, the gradient of each variable, the rows' logits and the seconds of the
    /// forward and backward passes, for one micro-batch.
    #[allow(clippy::type_complexity)]
    fn micro_batch(
        &self,
        rows: &[&TrainRow],
        scales: &[f64],
        key: u64,
    ) -> Result<(LossTerms, Vec<Option<Tensor>>, Vec<[f32; 3]>, (f64, f64))> {
        let started = Instant::now();
        let model = &self.model;
        let device = model.device().clone();
        let pad = model.pad_token_id().unwrap_or(0);
        let ids: Vec<&[u32]> = rows.iter().map(|r| r.input_ids.as_slice()).collect();
        let batch = PaddedBatch::pad(&ids, pad, self.config.padding)?;
        let labels = Tensor::from_vec(
            rows.iter().map(|r| r.label).collect::<Vec<u32>>(),
            (rows.len(),),
            &device,
        )?;
        let teachers = (0..self.teachers)
            .map(|t| {
                let values: Vec<f32> = rows.iter().flat_map(|r| r.teachers[t]).collect();
                Tensor::from_vec(values, (rows.len(), 3), &device)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let scales = Tensor::from_vec(scales.to_vec(), (rows.len(),), &device)?;
        let state = model.batch_state(&batch, true)?;
        let layers = model.layers();
        let layer_key = |l: usize| dropout::key(&[key, l as u64]);
        let mut grads: Vec<Option<Tensor>> = vec![None; self.vars.len()];
        let mut collect = |store: &candle_core::backprop::GradStore| {
            for (slot, var) in grads.iter_mut().zip(&self.vars) {
                if let Some(g) = store.get(var.as_tensor()) {
                    *slot = Some(match slot.take() {
                        Some(a) => (a + g)?,
                        None => g.clone(),
                    });
                }
            }
            Ok::<_, candle_core::Error>(())
        };
        let mut xs = model.embed(&batch)?;
        let terms;
        let logits;
        let forward_end;
        if !self.config.gradient_checkpointing {
            for (l, layer) in layers.iter().enumerate() {
                xs = dropout::with_key(layer_key(l), || layer.forward_t(&xs, &state, true))?;
                crate::device::sample_memory(&device);
            }
            logits = model.head(&xs, &state, true)?;
            let (loss, t) = distill_loss(&logits, &labels, &teachers, &scales, &self.config.loss)?;
            terms = t;
            forward_end = Instant::now();
            let store = loss.backward()?;
            collect(&store)?;
        } else {
            // Keep each layer's input only; recompute the layer in the backward pass.
            let mut inputs = Vec::with_capacity(layers.len());
            for (l, layer) in layers.iter().enumerate() {
                let input = xs.detach();
                xs = dropout::with_key(layer_key(l), || layer.forward_t(&input, &state, true))?
                    .detach();
                inputs.push(input);
                crate::device::sample_memory(&device);
            }
            let last = Var::from_tensor(&xs)?;
            logits = model.head(last.as_tensor(), &state, true)?;
            let (loss, t) = distill_loss(&logits, &labels, &teachers, &scales, &self.config.loss)?;
            terms = t;
            forward_end = Instant::now();
            let store = loss.backward()?;
            collect(&store)?;
            let mut upstream = store
                .get(last.as_tensor())
                .ok_or_else(|| ModelError::Input("no gradient reached the last layer".into()))?
                .detach();
            for (l, layer) in layers.iter().enumerate().rev() {
                // Each layer's input is released once its backward is done, as torch's
                // checkpointing does: the last layers' inputs are not held while the
                // gradients of the first ones accumulate.
                let saved = inputs
                    .pop()
                    .ok_or_else(|| ModelError::Input(format!("layer {l}'s input was not kept")))?;
                let (input, x) = if l == 0 {
                    (None, saved)
                } else {
                    let var = Var::from_tensor(&saved)?;
                    let x = var.as_tensor().clone();
                    (Some(var), x)
                };
                let out = dropout::with_key(layer_key(l), || layer.forward_t(&x, &state, true))?;
                // The vector-Jacobian product d/dθ Σ (out ⊙ upstream): the layer's backward
                // seeded with upstream.
                let store = crate::ops::seed::seeded(&out, &upstream)?.backward()?;
                collect(&store)?;
                if let Some(input) = &input {
                    upstream = store
                        .get(input.as_tensor())
                        .ok_or_else(|| {
                            ModelError::Input(format!("no gradient reached layer {l}'s input"))
                        })?
                        .detach();
                }
                crate::device::sample_memory(&device);
            }
        }
        let values = logits
            .detach()
            .to_dtype(DType::F32)?
            .to_device(&candle_core::Device::Cpu)?
            .to_vec2::<f32>()?;
        let values = values.into_iter().map(|r| [r[0], r[1], r[2]]).collect();
        device.synchronize()?;
        let forward = (forward_end - started).as_secs_f64();
        Ok((
            terms,
            grads,
            values,
            (forward, forward_end.elapsed().as_secs_f64()),
        ))
    }

    /// The dev rows' mean log loss and accuracy (inference path, no dropout).
    pub fn evaluate(&mut self) -> Result<EvalMetrics> {
        let step = self.next_step;
        let rows: Vec<&TrainRow> = self.dev.iter().collect();
        let mut nll = 0.0;
        let mut correct = 0usize;
        for members in micro_batches(&rows, self.config.max_batch_tokens) {
            let part: Vec<&[u32]> = members
                .iter()
                .map(|&i| rows[i].input_ids.as_slice())
                .collect();
            let pad = self.model.pad_token_id().unwrap_or(0);
            let batch = PaddedBatch::pad(&part, pad, self.config.padding)?;
            let logits = self
                .model
                .forward_t(&batch, false)?
                .to_dtype(DType::F64)?
                .to_device(&candle_core::Device::Cpu)?;
            let log_p = candle_nn::ops::log_softmax(&logits, 1)?.to_vec2::<f64>()?;
            for (&i, lp) in members.iter().zip(&log_p) {
                let label = rows[i].label as usize;
                nll -= lp[label];
                let argmax = (0..3).fold(0, |b, c| if lp[c] > lp[b] { c } else { b });
                correct += usize::from(argmax == label);
            }
        }
        let n = rows.len().max(1) as f64;
        let metrics = EvalMetrics {
            step,
            epoch: match step {
                0 => 0.0,
                s => self.plan[s - 1].epoch_progress,
            },
            rows: rows.len(),
            log_loss: nll / n,
            accuracy: correct as f64 / n,
        };
        // Before the first step there is nothing trained to keep.
        if step > 0
            && self
                .best
                .as_ref()
                .is_none_or(|b| metrics.log_loss < b.log_loss)
        {
            self.best = Some(Best {
                log_loss: metrics.log_loss,
                step,
                tensors: self
                    .vars
                    .iter()
                    .map(|v| v.as_tensor().copy())
                    .collect::<candle_core::Result<_>>()?,
            });
        }
        Ok(metrics)
    }
}

/// The training rows grouped by id (both orders of a comparison stay together), in order of
/// first appearance.
fn units(rows: &[TrainRow]) -> Vec<Vec<usize>> {
    let mut index: HashMap<&str, usize> = HashMap::new();
    let mut units: Vec<Vec<usize>> = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        match index.get(row.id.as_str()) {
            Some(&u) => units[u].push(i),
            None => {
                index.insert(&row.id, units.len());
                units.push(vec![i]);
            }
        }
    }
    units
}

/// Every epoch's order (the units shuffled by seed and epoch, or in input order) cut into
/// steps of up to `batch_rows` rows; the last step of an epoch may be smaller. Cut at
/// `max_steps`.
fn plan_steps(rows: &[TrainRow], config: &TrainConfig) -> Vec<PlannedStep> {
    let units = units(rows);
    let epochs = if config.max_steps.is_some() {
        usize::MAX
    } else {
        config.epochs
    };
    let mut plan = Vec::new();
    for epoch in 0..epochs {
        let mut order: Vec<usize> = (0..units.len()).collect();
        if config.shuffle {
            let mut rng = SplitMix64::new(dropout::key(&[config.seed, 0x5eed, epoch as u64]));
            for i in (1..order.len()).rev() {
                let j = (rng.next_u64() % (i as u64 + 1)) as usize;
                order.swap(i, j);
            }
        }
        let mut steps: Vec<Vec<usize>> = Vec::new();
        let mut current: Vec<usize> = Vec::new();
        for &u in &order {
            if !current.is_empty() && current.len() + units[u].len() > config.batch_rows {
                steps.push(std::mem::take(&mut current));
            }
            current.extend(&units[u]);
        }
        if !current.is_empty() {
            steps.push(current);
        }
        let n = steps.len();
        for (k, rows) in steps.into_iter().enumerate() {
            plan.push(PlannedStep {
                rows,
                epoch_progress: epoch as f64 + (k + 1) as f64 / n as f64,
            });
            if config.max_steps.is_some_and(|m| plan.len() >= m) {
                return plan;
            }
        }
        if config.max_steps.is_none() && epoch + 1 == epochs {
            break;
        }
    }
    plan
}

/// The indices of `rows`, longest row first (ties by id and order).
fn longest_first(rows: &[&TrainRow]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by(|&a, &b| {
        rows[b]
            .input_ids
            .len()
            .cmp(&rows[a].input_ids.len())
            .then_with(|| rows[a].id.cmp(&rows[b].id))
            .then_with(|| rows[a].order.cmp(&rows[b].order))
    });
    order
}

/// A step's rows split into micro-batches whose padded size (rows × longest row) stays
/// under `max_tokens` (a longer row goes alone): rows sorted by length, longest first.
fn micro_batches(rows: &[&TrainRow], max_tokens: usize) -> Vec<Vec<usize>> {
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut longest = 0;
    for i in longest_first(rows) {
        let len = rows[i].input_ids.len();
        match batches.last_mut() {
            Some(b) if (b.len() + 1) * longest.max(len) <= max_tokens => {
                b.push(i);
                longest = longest.max(len);
            }
            _ => {
                batches.push(vec![i]);
                longest = len;
            }
        }
    }
    batches
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, order: &str, len: usize) -> TrainRow {
        TrainRow {
            id: id.into(),
            order: order.into(),
            input_ids: vec![1; len],
            label: 0,
            weight: 1.0,
            teachers: vec![],
            dev: false,
        }
    }

    #[test]
    fn both_orders_share_a_step_and_epochs_reshuffle() {
        let rows: Vec<TrainRow> = (0..10)
            .flat_map(|i| [row(&format!("{i}"), "ab", 5), row(&format!("{i}"), "ba", 5)])
            .collect();
        let config = TrainConfig {
            batch_rows: 4,
            epochs: 2,
            ..Default::default()
        };
        let plan = plan_steps(&rows, &config);
        assert_eq!(plan.len(), 10);
        for step in &plan {
            assert_eq!(step.rows.len(), 4);
            for &r in &step.rows {
                let partner = if r % 2 == 0 { r + 1 } else { r - 1 };
                assert!(step.rows.contains(&partner));
            }
        }
        let first: Vec<_> = plan[..5].iter().flat_map(|s| s.rows.clone()).collect();
        let second: Vec<_> = plan[5..].iter().flat_map(|s| s.rows.clone()).collect();
        assert_ne!(first, second);
        assert_eq!(plan[4].epoch_progress, 1.0);
        let in_order = plan_steps(
            &rows,
            &TrainConfig {
                shuffle: false,
                max_steps: Some(7),
                ..config
            },
        );
        assert_eq!(in_order.len(), 7);
        assert_eq!(in_order[0].rows, vec![0, 1, 2, 3]);
        assert_eq!(
            in_order[5].rows,
            vec![0, 1, 2, 3],
            "max_steps runs into epoch 2"
        );
    }

    #[test]
    fn micro_batches_stay_under_the_token_budget() {
        let rows = [
            row("a", "ab", 10),
            row("b", "ab", 3),
            row("c", "ab", 7),
            row("d", "ab", 25),
        ];
        let refs: Vec<&TrainRow> = rows.iter().collect();
        let batches = micro_batches(&refs, 20);
        assert_eq!(batches, vec![vec![3], vec![0, 2], vec![1]]);
    }
}
