"""Real-scale cost of the three-lens pass: 7B-shaped LLaVA-1.5 and InstructBLIP-Vicuna-7B built
directly on the device with random weights (no download), side by side with a plain HF forward.

    python benchmarks/gpu.py --size 7b --family llava --batches 1 8 32 --dtype float16   # on a GPU
    python benchmarks/gpu.py --size 7b --family qwen2_5_vl --batches 1 8 --dtype bfloat16  # Qwen2.5-VL-7B
    python benchmarks/gpu.py --size mid --batches 1 4 --device cpu                       # anywhere
    python benchmarks/gpu.py --size 7b --dtype float16 --batches 8 --pipeline 256        # dataset run

For each batch size it prints, measured round-robin in one run: HF forward with sdpa attention (the
baseline), HF eager, the hooked forward, `run_with_cache` of resid_post, and the one-pass collector
(contextualization + norm-based attention per head and head-summed + logit lens at the last
position, every layer), with peak memory (CUDA: max allocated; CPU: resident high-water mark) and
items/s. ``--pipeline N`` then runs the dataset path the CLI runs (`run_phase_diagram`: N synthetic
JPEGs on disk, decoding and the processor in DataLoader workers, the collector with image
verbalization, per-batch Parquet writes, aggregation) and times the HF sdpa forward alone on the
same batches, prepared beforehand on the device.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    InstructBlipConfig,
    InstructBlipForConditionalGeneration,
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    PROMPT,
    image_folder,
    interleaved_times,
    peak_memory_mb,
    sample_images,
    synchronize,
)

from hooked_vllm import HookedVLM  # noqa: E402
from hooked_vllm.analysis import collect  # noqa: E402
from hooked_vllm.model.images import load_image  # noqa: E402
from hooked_vllm.runs.phase_diagram import run_phase_diagram  # noqa: E402
from hooked_vllm.testing import TinyTextConfig, tiny_instructblip, tiny_llava, tiny_qwen2_5_vl  # noqa: E402

# LLaMA-7B / Vicuna-7B text backbone with CLIP ViT-L/14-336 or EVA ViT-g/14 + Q-Former ("full"
# vision), or a mid-size one with a small vision side. The 7B shapes keep the real vocabularies
# (LLaVA-1.5: 32064, InstructBLIP-Vicuna: 32001): the unembedding and the logit lens scale with it.
REAL_VOCAB = {"llava": 32064, "instructblip": 32001, "qwen2_5_vl": 152064}
SIZES = {
    "7b": (
        TinyTextConfig(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_mlp=11008, n_ctx=4096),
        True,
    ),
    "mid": (TinyTextConfig(d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, d_mlp=1376, n_ctx=4096), False),
}


def _vision_sizes(sizes: tuple[int, int, int, int]) -> dict[str, int]:
    """(width, MLP width, layers, heads) as vision-config keywords."""
    return dict(
        zip(
            ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
            sizes,
            strict=True,
        )
    )


def build(family: str, size_name: str, device: str, dtype: torch.dtype):
    """A random model of the requested shape, built on ``device`` in ``dtype``, with a tiny
    in-process tokenizer/processor of the right image geometry."""
    text, full = SIZES[size_name]

    def text_config(tokenizer):
        vocab = max(len(tokenizer), REAL_VOCAB[family] if full else 0)
        return text.llama_config(vocab, tokenizer)

    if family == "qwen2_5_vl":
        model_class, config, processor = qwen2_5_vl_config(text_config, full)
    elif family == "llava":
        _, processor = tiny_llava(image_size=336, patch_size=14)
        vision = CLIPVisionConfig(
            **_vision_sizes((1024, 4096, 24, 16) if full else (64, 128, 2, 4)),
            image_size=336,
            patch_size=14,
            projection_dim=768 if full else 512,
        )
        tokenizer = processor.tokenizer
        config = LlavaConfig(
            vision_config=vision,
            text_config=text_config(tokenizer),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            pad_token_id=tokenizer.pad_token_id,
        )
        config.architectures = ["LlavaForConditionalGeneration"]
        model_class = LlavaForConditionalGeneration
    else:
        _, processor = tiny_instructblip(image_size=224, patch_size=14, num_query_tokens=32)
        tokenizer = processor.tokenizer
        vision = InstructBlipVisionConfig(
            **_vision_sizes((1408, 6144, 39, 16) if full else (64, 128, 2, 4)), image_size=224, patch_size=14
        )
        qformer = InstructBlipQFormerConfig(
            vocab_size=len(processor.qformer_tokenizer),
            hidden_size=768 if full else 64,
            num_hidden_layers=12 if full else 2,
            num_attention_heads=12 if full else 4,
            intermediate_size=3072 if full else 128,
            encoder_hidden_size=vision.hidden_size,
        )
        config = InstructBlipConfig(
            vision_config=vision.to_dict(),
            qformer_config=qformer.to_dict(),
            text_config=text_config(tokenizer).to_dict(),
            num_query_tokens=32,
            image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        )
        config.architectures = ["InstructBlipForConditionalGeneration"]
        model_class = InstructBlipForConditionalGeneration
    with torch.device(device):
        model = model_class._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval(), processor


def qwen2_5_vl_config(text_config, full: bool):
    """Qwen2.5-VL-7B's shapes ("full"): a 28-layer, 3584-wide Qwen2 LM with 28 query and 4 key/value
    heads and M-RoPE sections (16, 24, 24), a 32-block windowed ViT (1280 wide, patch 14, 2x2 merge);
    images resized to about 672 x 672 pixels (576 image tokens, as LLaVA-1.5's)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLVisionConfig,
        Qwen2VLImageProcessor,
    )

    _, processor = tiny_qwen2_5_vl()
    tokenizer = processor.tokenizer
    processor.image_processor = Qwen2VLImageProcessor(
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": 672 * 672, "longest_edge": 672 * 672},
    )
    if full:
        text = Qwen2_5_VLTextConfig(
            vocab_size=REAL_VOCAB["qwen2_5_vl"],
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        )
        vision = Qwen2_5_VLVisionConfig(
            depth=32,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            out_hidden_size=3584,
            fullatt_block_indexes=[7, 15, 23, 31],
        )
    else:
        llama = text_config(tokenizer)
        head_dim = llama.hidden_size // llama.num_attention_heads
        quarter = head_dim // 8  # M-RoPE sections in 7B's proportions (1/4, 3/8, 3/8 of head_dim / 2)
        text = Qwen2_5_VLTextConfig(
            vocab_size=llama.vocab_size,
            hidden_size=llama.hidden_size,
            intermediate_size=llama.intermediate_size,
            num_hidden_layers=llama.num_hidden_layers,
            num_attention_heads=llama.num_attention_heads,
            num_key_value_heads=llama.num_key_value_heads,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            max_position_embeddings=llama.max_position_embeddings,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 1e6,
                "mrope_section": [
                    quarter,
                    (head_dim // 2 - quarter) // 2,
                    head_dim // 2 - quarter - (head_dim // 2 - quarter) // 2,
                ],
            },
        )
        vision = Qwen2_5_VLVisionConfig(
            depth=2,
            hidden_size=64,
            intermediate_size=128,
            num_heads=4,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            out_hidden_size=text.hidden_size,
            fullatt_block_indexes=[1],
        )
    text.vocab_size = max(text.vocab_size, len(tokenizer))
    text.pad_token_id, text.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    text.bos_token_id = tokenizer.bos_token_id  # None: Qwen prepends no BOS
    ids = {
        "image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    }
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=False, **ids)
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return Qwen2_5_VLForConditionalGeneration, config, processor


def peak(fn, device: str) -> float:
    if device.startswith("cuda"):
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return peak_memory_mb(fn)


def sdpa_on(vlm, fn):
    """``fn()`` with ``vlm.use_sdpa`` switched on."""
    vlm.use_sdpa = True
    try:
        return fn()
    finally:
        vlm.use_sdpa = False


def pipeline(vlm, sdpa_model, n: int, batch_size: int, device: str, workers: int) -> None:
    """Items/s of `run_phase_diagram` over ``n`` images against the HF sdpa forward alone."""
    with tempfile.TemporaryDirectory() as tmp:
        sample = image_folder(n, Path(tmp))
        prepared = []
        for start in range(0, n, batch_size):
            items = sample.items[start : start + batch_size]
            images = [load_image(item.image_path) for item in items]
            batch = vlm.prepare(images, [item.instruction for item in items]).to(device)
            prepared.append({**batch.inputs, "position_ids": batch.position_ids})
        sdpa_model(**prepared[0])  # warm-up
        synchronize(device)
        start = time.perf_counter()
        for inputs in prepared:
            sdpa_model(**inputs)
        synchronize(device)
        forward_s = time.perf_counter() - start
        run_phase_diagram(
            vlm, sample, Path(tmp) / "warm-up", batch_size=batch_size, progress=False, max_batches=1
        )
        run_s = {}
        for verbalize in (True, False):
            synchronize(device)
            start = time.perf_counter()
            run_phase_diagram(
                vlm,
                sample,
                Path(tmp) / f"out-{verbalize}",
                batch_size=batch_size,
                workers=workers,
                verbalize_images=verbalize,
                progress=False,
            )
            synchronize(device)
            run_s[verbalize] = time.perf_counter() - start
    print(f"dataset path, {n} images, batch {batch_size}, {workers} DataLoader workers")
    print(f"  HF sdpa forward alone (batches prepared beforehand)  {n / forward_s:7.2f} items/s")
    for verbalize, seconds in run_s.items():
        label = "with image verbalization" if verbalize else "--no-verbalize-images"
        print(
            f"  run_phase_diagram, {label:25s} (decode + processor + collector + Parquet + aggregates)"
            f"  {n / seconds:7.2f} items/s  ({seconds / forward_s:.2f}x the forward's time)"
        )


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", choices=["llava", "instructblip", "qwen2_5_vl"], default="llava")
    parser.add_argument("--size", choices=sorted(SIZES), default="mid")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--pipeline", type=int, default=0, metavar="N", help="also run the dataset path on N images"
    )
    parser.add_argument("--pipeline-batch", type=int, default=8)
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers for --pipeline")
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="also write the times as JSON ({'batch N': {name: s}}), for ab.py",
    )
    parser.add_argument(
        "--only", nargs="+", default=None, metavar="NAME", help="time only these (and HF sdpa, the baseline)"
    )
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    sdpa_model, processor = build(args.family, args.size, args.device, dtype)
    eager_model = copy.deepcopy(sdpa_model)
    eager_model.set_attn_implementation("eager")
    vlm = HookedVLM.from_hf(copy.deepcopy(sdpa_model), processor)
    print(
        f"{args.family} {args.size}: {vlm.cfg.n_layers} layers x {vlm.cfg.d_model}, {args.device}, "
        f"{args.dtype}, torch {torch.__version__}"
    )
    resid = [f"blocks.{layer}.hook_resid_post" for layer in range(vlm.cfg.n_layers)]
    measured: dict[str, dict[str, float]] = {}
    for batch_size in args.batches:
        batch = vlm.prepare(sample_images(batch_size), [PROMPT] * batch_size).to(args.device)
        inputs = {**batch.inputs, "position_ids": batch.position_ids}  # 3-D M-RoPE ones for Qwen
        fns = {
            "HF sdpa": lambda inputs=inputs: sdpa_model(**inputs),
            "HF eager": lambda inputs=inputs: eager_model(**inputs),
            "hooked forward": lambda batch=batch: vlm(batch),
            "run_with_cache(resid_post)": lambda batch=batch: vlm.run_with_cache(batch, names_filter=resid),
            "hooked forward, use_sdpa": lambda batch=batch: sdpa_on(vlm, lambda: vlm(batch)),
            "run_with_cache(resid_post), use_sdpa": lambda batch=batch: sdpa_on(
                vlm, lambda: vlm.run_with_cache(batch, names_filter=resid)
            ),
            "collect, pattern hooks": lambda batch=batch: collect(vlm, batch, attention="pattern"),
            "collect (3 lenses)": lambda batch=batch: collect(vlm, batch),
        }
        if args.only:
            fns = {name: fn for name, fn in fns.items() if name == "HF sdpa" or name in args.only}
        times = interleaved_times(fns, args.repeats, args.device)
        measured[f"batch {batch_size}"] = times
        memory = {name: peak(fn, args.device) for name, fn in fns.items()}
        base = times["HF sdpa"]
        print(
            f"batch {batch_size}, {batch.input_ids.shape[1]} positions "
            f"({int(batch.image_mask[0].sum())} image)"
        )
        for name, seconds in times.items():
            print(
                f"  {name:38s} {seconds * 1000:9.1f} ms  {seconds / base:5.2f}x  "
                f"{batch_size / seconds:7.2f} items/s  peak +{memory[name]:8.0f} MiB"
            )
    if args.json is not None:
        import hooked_vllm

        args.json.write_text(json.dumps({"hooked_vllm": hooked_vllm.__file__, "seconds": measured}))
    if args.pipeline:
        pipeline(vlm, sdpa_model, args.pipeline, args.pipeline_batch, args.device, args.workers)


if __name__ == "__main__":
    main()
