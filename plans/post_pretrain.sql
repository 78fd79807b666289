-- Stage 1 (the recipe's "UT" post-pretrain): fine-tune a model on the extra preference
-- sources (every source of prepare.sql's table but the Kaggle train rows, so that no fold's
-- held-out rows are seen), in both A/B orders, before the per-fold teachers and the student
-- start from its adapter (init_adapter of train_teacher.sql and distill.sql). A seeded
-- share of the ids is the dev split. Writes train/{model_name}/post_pretrain/ (metrics and
-- adapter/); resumable as train_teacher.sql.
--
-- stage post_pretrain
-- param comparisons = ${run_dir}/prepare/comparisons.parquet -- prepare.sql's output
-- param train_source = kaggle -- the source left out (the folds' rows)
-- param dev_percent: int = 5 -- share of the ids evaluated, not trained on (by a hash of the id)
-- param model -- the model: a folder (config.json + safetensors), a .gguf file, or a hub id org/name
-- param model_name = base -- names the output folder: train/{model_name}/post_pretrain/
-- param tokenizer -- the model's tokenizer.json (tokenizer_config.json beside it names EOS)
-- param template = blackpearl -- blackpearl, emiz, or a template file
-- param max_length: int = 1024 -- tokens per input, BOS and EOS included
-- param truncation = balanced -- balanced (prompt capped, answers evened), right, left
-- param prompt_cap: int = 256 -- the balanced truncation's prompt limit
-- param lora_r: int = 16 -- LoRA rank
-- param lora_alpha: float = 32 -- LoRA alpha
-- param lora_dropout: float = 0.05 -- dropout on the LoRA input
-- param lora_autocast: bool = false -- the LoRA matmuls in the model's dtype as torch.autocast (true) or in f32 as PEFT (false)
-- param target_modules = all-linear -- all-linear, module names (q_proj,v_proj) or a regex
-- param lr: float = 0.0002 -- peak learning rate
-- param schedule = cosine -- cosine, linear or constant, after a linear warm-up
-- param warmup_ratio: float = 0.1 -- warm-up share of the steps
-- param epochs: int = 1 -- passes over the training rows
-- param max_steps: int = 0 -- stop after this many steps (0: by epochs)
-- param batch_rows: int = 16 -- rows per optimizer step (both orders of an id together)
-- param max_batch_tokens: int = 8192 -- padded tokens per micro-batch
-- param adam_beta1: float = 0.9 -- AdamW beta1
-- param adam_beta2: float = 0.95 -- AdamW beta2
-- param weight_decay: float = 0.0 -- AdamW decoupled weight decay
-- param max_grad_norm: float = 1.0 -- gradient clipping (0: off)
-- param shuffle: bool = true -- shuffle the rows each epoch
-- param seed: int = 2025 -- data order, dropout, LoRA init
-- param eval_every: int = 0 -- evaluate the dev side every N steps (0: at the end only)
-- param keep = last -- last or best (by dev log loss: that fold's CV is then optimistic)
-- param gradient_checkpointing: bool = false -- recompute each layer in the backward pass
-- param dtype = bf16 -- base weights: bf16, f16 or f32
-- param device = cpu -- cpu, cuda or cuda:N; a missing device fails the run
-- param checkpoint_every: int = 50 -- commit a resumable checkpoint every N steps

CREATE EXTERNAL TABLE comparisons STORED AS PARQUET LOCATION '${comparisons}';

CREATE VIEW extra_rows AS
    SELECT CASE WHEN shard_of(id, 100) < ${dev_percent} THEN 'dev' ELSE 'train' END AS split,
           id, source, prompt, response_a, response_b, label
    FROM comparisons
    WHERE source <> '${train_source}';

SELECT ensure(count(*) FILTER (WHERE split = 'train') > 0, 'post_pretrain: no rows from sources other than ${train_source} in ${comparisons} (set pandalm, hh_rlhf or ultrafeedback in prepare.sql)') AS has_rows,
       count(*) AS ids, count(DISTINCT source) AS sources
FROM extra_rows;

-- Both orders of every id (the swapped copy with its label swapped) stay in one step.
CREATE VIEW tokens AS
    SELECT split, id, 'ab' AS "order", label, input_ids
    FROM tokenize('extra_rows', '${tokenizer}', '${template}', ${max_length}, '${truncation}', 'ab', ${prompt_cap})
    UNION ALL
    SELECT split, id, 'ba' AS "order", swap_label(label) AS label, input_ids
    FROM tokenize('extra_rows', '${tokenizer}', '${template}', ${max_length}, '${truncation}', 'ba', ${prompt_cap});

COPY (
    SELECT * FROM distill_step('tokens', '${model}',
        'lora_r=${lora_r} lora_alpha=${lora_alpha} lora_dropout=${lora_dropout} lora_autocast=${lora_autocast}
         target_modules=${target_modules} lr=${lr} schedule=${schedule} warmup_ratio=${warmup_ratio}
         epochs=${epochs} max_steps=${max_steps} batch_rows=${batch_rows} max_batch_tokens=${max_batch_tokens}
         adam_beta1=${adam_beta1} adam_beta2=${adam_beta2} weight_decay=${weight_decay}
         max_grad_norm=${max_grad_norm} shuffle=${shuffle} seed=${seed} eval_every=${eval_every}
         keep=${keep} gradient_checkpointing=${gradient_checkpointing} dtype=${dtype}
         device=${device} checkpoint_every=${checkpoint_every}')
) TO '${run_dir}/train/${model_name}/post_pretrain/' STORED AS PARQUET;

CREATE EXTERNAL TABLE metrics STORED AS PARQUET LOCATION '${run_dir}/train/${model_name}/post_pretrain/';

SELECT step, round(epoch, 3) AS epoch, rows, round(dev_log_loss, 4) AS dev_log_loss,
       round(dev_accuracy, 3) AS dev_accuracy
FROM metrics WHERE kind = 'eval' ORDER BY step;
