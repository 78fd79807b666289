//! Readers on files written the way their publishers ship them.

use arenaflow_engine::ArenaSession;
use datafusion::arrow::util::pretty::pretty_format_batches;

/// chatbot_arena_conversations as published: Parquet with `conversation_a/b` as
/// list<struct<content, role>>.
#[tokio::test]
async fn arena_conversations_from_parquet() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("conversations.parquet");
    let session = ArenaSession::new();
    let write = format!(
        "COPY (SELECT * FROM (VALUES \
           ('58210e39b3fd4441a2bd4a518bb44c2d', 'chatglm-6b', 'koala-13b', 'tie (bothbad)', \
            [named_struct('content', 'What is the difference?', 'role', 'user'), named_struct('content', 'A answer', 'role', 'assistant')], \
            [named_struct('content', 'What is the difference?', 'role', 'user'), named_struct('content', 'B answer', 'role', 'assistant')]), \
           ('2564acd09e3942fd97657d05282d4389', 'oasst-pythia-12b', 'alpaca-13b', 'model_b', \
            [named_struct('content', 'q1', 'role', 'user'), named_struct('content', 'a1', 'role', 'assistant'), named_struct('content', 'q2', 'role', 'user'), named_struct('content', 'a2', 'role', 'assistant')], \
            [named_struct('content', 'q1', 'role', 'user'), named_struct('content', 'b1', 'role', 'assistant'), named_struct('content', 'q2', 'role', 'user'), named_struct('content', 'b2', 'role', 'assistant')]) \
         ) AS t(question_id, model_a, model_b, winner, conversation_a, conversation_b)) TO '{}' STORED AS PARQUET",
        path.display()
    );
    session
        .ctx
        .sql(&write)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let read = format!("SELECT id, source, prompt, response_a, response_b, model_a, label FROM arena_conversations('{}') ORDER BY id", path.display());
    let batches = session
        .ctx
        .sql(&read)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let table = pretty_format_batches(&batches).unwrap().to_string();
    let expected = "\
+----------------------------------+---------------------+---------------------------+------------+------------+------------------+-------+
| id                               | source              | prompt                    | response_a | response_b | model_a          | label |
+----------------------------------+---------------------+---------------------------+------------+------------+------------------+-------+
| 2564acd09e3942fd97657d05282d4389 | arena_conversations | [q1, q2]                  | [a1, a2]   | [b1, b2]   | oasst-pythia-12b | 1     |
| 58210e39b3fd4441a2bd4a518bb44c2d | arena_conversations | [What is the difference?] | [A answer] | [B answer] | chatglm-6b       | 2     |
+----------------------------------+---------------------+---------------------------+------------+------------+------------------+-------+";
    assert_eq!(table, expected);
}
