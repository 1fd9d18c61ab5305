"""python -m jaxrl.data {tokenizer,process} MANIFEST --out DIR [key.sub=value ...]

  tokenizer  train a byte-level BPE on the manifest's cleaned mixture -> DIR/tokenizer.json
  process    normalise, filter, dedup, tokenise, pack and shard -> DIR/{index,stats}.json + ArrayRecord
             shards; re-running the same command resumes, skipping finished shards

MANIFEST is a YAML file typed by `jaxrl.data.manifest.Manifest` (see configs/corpus_*.yaml);
`key.sub=value` overrides it as run configs are overridden. Train with the shards through
`python -m jaxrl.launch configs/sft_*.yaml data.path=DIR`.
"""

from __future__ import annotations

import argparse
import json
import sys

from jaxrl.core.config import ConfigError, parse_overrides
from jaxrl.data.sources import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxrl.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["tokenizer", "process"])
    parser.add_argument("manifest")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--vocab-size", type=int, default=0, help="tokenizer: overrides train_tokenizer.vocab_size")
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    args = parser.parse_intermixed_args(argv)
    from jaxrl.data import corpus, train_tokenizer
    from jaxrl.data.manifest import load_manifest

    try:
        manifest = load_manifest(args.manifest, parse_overrides(args.overrides))
        if args.command == "tokenizer":
            train_tokenizer.train(manifest, args.out, vocab_size=args.vocab_size)
        else:
            stats = corpus.process(manifest, args.out)
            print(json.dumps({k: stats[k] for k in ("total", "tokens", "shards")}, indent=1))
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
