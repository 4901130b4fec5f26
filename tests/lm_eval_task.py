"""lm-evaluation-harness tasks over a split of a local text, for a run that needs no hub (README, "Loading a model
with transformers"):

    python -m tests.lm_eval_task --data sample --split test --out /tmp/h64lm-tasks
    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True,max_length=128,dtype=float32 \\
        --include_path /tmp/h64lm-tasks --tasks h64lm_stream,h64lm_documents --device cpu --batch_size 8

Two tasks, both scored with lm-eval's own rolling windows (loglikelihood_rolling) on the split's articles as h64lm
reads them (h64lm.documents: an article from each `= Title =` heading, its lines joined by newlines), both counting
words as `h64lm.py eval` does (WikiText's count: whitespace-separated words plus one per line):

- h64lm_stream computes what `h64lm.py eval` computes: its one document is the whole split with each article
  after the first behind a `<s>`, which the tokenizer reads as the BOS token, so lm-eval's tokens are h64lm's token
  stream exactly (each article is <s> + text, the articles one after another), and its windows of max_length
  tokens, each predicting from the token before it, with a last window that scores only the tokens the others
  left, are h64lm's evaluate's. Bytes are the articles' UTF-8 bytes, without the `<s>` markers.
- h64lm_documents is lm-eval's usual convention: each article alone, from its <s>, the context starting afresh.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import h64lm  # noqa: E402

PROCESS_RESULTS = '''"""process_results of the h64lm tasks: the word and byte counts are the document's own fields (see
tests/lm_eval_task.py), not lm-eval's count of the text it scores."""


def process_results(doc, results):
    (loglikelihood,) = results
    return {"word_perplexity": (loglikelihood, doc["words"]), "byte_perplexity": (loglikelihood, doc["bytes"]),
            "bits_per_byte": (loglikelihood, doc["bytes"])}
'''


def task_yaml(name: str, data_file: Path) -> str:
    lines = [f"task: {name}", "dataset_path: json", "dataset_kwargs:", "  data_files:",
             f"    test: {json.dumps(str(data_file))}", "test_split: test", "output_type: loglikelihood_rolling",
             'doc_to_text: ""', 'doc_to_target: "{{text}}"', "process_results: !function h64lm_lm_eval.process_results",
             "metric_list:", *(f"  - metric: {m}" for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")),
             "metadata:", "  version: 1.0"]
    return "\n".join(lines) + "\n"


def counts(docs: list[str]) -> dict:
    """WikiText's word count (h64lm.count_words) and the UTF-8 bytes of the articles."""
    return {"words": sum(h64lm.count_words(doc[:-1].split("\n")) for doc in docs),
            "bytes": sum(len(doc.encode("utf-8")) for doc in docs)}


def write_tasks(data: str, split: str, out: Path, articles: int | None = None) -> dict:
    """The two tasks' files in out (their YAML, data as JSON lines, and process_results), over the split's first
    `articles` articles (all by default). Returns the words, bytes and articles they hold."""
    source = h64lm.open_text_source(data, log=lambda *a, **k: None)
    lines = source.read(h64lm.SPLIT_ALIASES[split])
    docs = list(h64lm.documents(lines))[:articles]
    if articles is None:  # every line of the split is in an article: the counts are those of `h64lm.py eval`
        assert counts(docs)["words"] == h64lm.count_words(lines)
    out.mkdir(parents=True, exist_ok=True)
    rows = {"h64lm_stream": [{"text": "<s>".join(docs), **counts(docs)}],
            "h64lm_documents": [{"text": doc, **counts([doc])} for doc in docs]}
    for name, records in rows.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (out / f"{name}.yaml").write_text(task_yaml(name, (out / f"{name}.jsonl").resolve()))
    (out / "h64lm_lm_eval.py").write_text(PROCESS_RESULTS)
    return {**counts(docs), "articles": len(docs), "data": source.name, "split": split}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="sample", help="as h64lm.py's --data")
    parser.add_argument("--split", default="test", choices=h64lm.SPLIT_ALIASES)
    parser.add_argument("--out", required=True, type=Path, help="folder for the tasks (lm_eval --include_path)")
    parser.add_argument("--articles", type=int, default=None, help="only the split's first N articles")
    args = parser.parse_args()
    print(json.dumps(write_tasks(args.data, args.split, args.out, args.articles)))


if __name__ == "__main__":
    main()
