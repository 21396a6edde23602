"""Cold synthesis vs warm cache, per item: how much pre-rendering (synthesize_many) saves a run.

    python benchmarks/bench_tts.py [--engine espeak-ng|piper] [--n 50]

Uses a fresh temporary cache directory, so the first pass is all misses and the second all hits.
"""

import argparse
import tempfile

from lmeval_speech.audio import TTSSpec, synthesize_many

SUBJECTS = ["the mitochondria", "a prime number", "the French Revolution", "photosynthesis", "the Treaty of Versailles",
            "a binary search tree", "the speed of light", "supply and demand", "the Pythagorean theorem", "plate tectonics"]
FRAMES = ["Which of the following best describes {}?", "What is the main consequence of {} in this scenario?",
          "According to the passage, why is {} considered important?", "Which statement about {} is false?",
          "How would an expert explain {} to a first-year student?"]


def sentences(n: int) -> list[str]:
    return [f"Question {i + 1}. " + FRAMES[i % len(FRAMES)].format(SUBJECTS[i // len(FRAMES) % len(SUBJECTS)])
            for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", default="espeak-ng")
    parser.add_argument("--n", type=int, default=50)
    args = parser.parse_args()
    texts, spec = sentences(args.n), TTSSpec(engine=args.engine)
    with tempfile.TemporaryDirectory() as cache_dir:
        cold = synthesize_many(texts, spec, cache_dir=cache_dir, progress=False)
        warm = synthesize_many(texts, spec, cache_dir=cache_dir, progress=False)
    assert cold["misses"] == warm["hits"] == len(texts), (cold, warm)
    cold_ms, warm_ms = 1000 * cold["seconds"] / len(texts), 1000 * warm["seconds"] / len(texts)
    print(f"{spec.engine}, {len(texts)} sentences: cold {cold_ms:.2f} ms/item, warm {warm_ms:.2f} ms/item, "
          f"cold/warm = {cold_ms / warm_ms:.1f}x")


if __name__ == "__main__":
    main()
