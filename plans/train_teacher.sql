-- Stage 3: fine-tune a teacher (LoRA adapters and the score head) on one fold's training
-- side (the other folds, with their swapped copies) and evaluate it on the fold's held-out
-- side (dev: evaluated, never trained on). Writes train/{model_name}/fold{fold}/: the
-- metrics (one row per optimizer step and per evaluation) and adapter/, a PEFT folder.
-- Checkpoints are committed every checkpoint_every steps: after kill -9 the same command
-- goes on from the last one.
--
-- stage train_teacher
-- param folds = ${run_dir}/folds/k5_seed2025_swaptrue/ -- folds.sql's output (its k, seed and swap are in the path)
-- param fold: int = 0 -- the fold held out as dev
-- param model -- the model: a folder (config.json + safetensors), a .gguf file, or a hub id org/name
-- param model_name = teacher -- names the output folder: train/{model_name}/fold{fold}/
-- param init_adapter = -- PEFT adapter to start from (e.g. post_pretrain.sql's); empty for fresh LoRA
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
-- param epochs: int = 2 -- passes over the training rows
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

CREATE EXTERNAL TABLE folds STORED AS PARQUET LOCATION '${folds}';

CREATE VIEW fold_rows AS
    SELECT CASE WHEN split = 'valid' THEN 'dev' ELSE 'train' END AS split,
           "order", id, source, prompt, response_a, response_b, label
    FROM folds
    WHERE CAST(fold AS INT) = ${fold};

SELECT ensure(count(*) FILTER (WHERE split = 'train') > 0, 'train_teacher: fold ${fold} has no training rows in ${folds}') AS has_rows
FROM fold_rows;

-- The rows come in the order they are stored; their responses are already swapped on the
-- 'ba' copies, so the template reads them as they are.
CREATE VIEW tokens AS
    SELECT split, id, "order", label, input_ids
    FROM tokenize('fold_rows', '${tokenizer}', '${template}', ${max_length}, '${truncation}', 'ab', ${prompt_cap});

COPY (
    SELECT * FROM distill_step('tokens', '${model}',
        'init_adapter="${init_adapter}" lora_r=${lora_r} lora_alpha=${lora_alpha} lora_dropout=${lora_dropout} lora_autocast=${lora_autocast}
         target_modules=${target_modules} lr=${lr} schedule=${schedule} warmup_ratio=${warmup_ratio}
         epochs=${epochs} max_steps=${max_steps} batch_rows=${batch_rows} max_batch_tokens=${max_batch_tokens}
         adam_beta1=${adam_beta1} adam_beta2=${adam_beta2} weight_decay=${weight_decay}
         max_grad_norm=${max_grad_norm} shuffle=${shuffle} seed=${seed} eval_every=${eval_every}
         keep=${keep} gradient_checkpointing=${gradient_checkpointing} dtype=${dtype}
         device=${device} checkpoint_every=${checkpoint_every}')
) TO '${run_dir}/train/${model_name}/fold${fold}/' STORED AS PARQUET;

CREATE EXTERNAL TABLE metrics STORED AS PARQUET LOCATION '${run_dir}/train/${model_name}/fold${fold}/';

SELECT step, round(epoch, 3) AS epoch, rows, round(dev_log_loss, 4) AS dev_log_loss,
       round(dev_accuracy, 3) AS dev_accuracy
FROM metrics WHERE kind = 'eval' ORDER BY step;

SELECT count(*) AS steps, round(min(loss), 4) AS min_loss, round(avg(tokens_per_s), 1) AS tokens_per_s
FROM metrics WHERE kind = 'step';
