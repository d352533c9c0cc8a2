"""Train the second demo model, ``demo-phases``, the way real VLMs are built (CPU, one command):

    python -m hooked_vllm.demo.train_phases [--out hooked_vllm/demo/phases] [--seed 0]

A LLaVA whose language model is 16 layers deep, trained in three seeded stages after a vision tower
pretrained alone (as ``train.py`` does: our stand-in for a pretrained CLIP, then frozen):

1. **text pretraining**: the language model alone, next-word prediction on every word of a
   synthetic corpus about scenes of shapes (``corpus.py``); no image, the projector untouched;
2. **alignment**: the language model frozen, the projector trained on image-caption pairs
   ("describe the image ." and "what is in the image ?", answered by a caption);
3. **instruction tuning**: projector and language model trained on the question-answer tasks
   (``train.TRAIN_KINDS``), loss on the answer words.

Writes the model (``HookedVLM.from_pretrained(out)``), ``training_summary.json``, and with
``--stages-dir`` the model after each stage (``stage1-text``, ``stage2-alignment``,
``stage3-instruction``) for the stage-wise curves of the model card.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from hooked_vllm.demo import corpus, shapes
from hooked_vllm.demo.train import (
    PATCH,
    SPECIALS,
    TRAIN_KINDS,
    accuracy,
    build_processor,
    pretrain_vision,
    training_batch,
)
from hooked_vllm.tiny_models import TinyTextConfig

OUT = Path(__file__).parent / "phases"
#: the language model's sizes (16 layers: deep enough for four phases)
TEXT = TinyTextConfig(d_model=64, n_layers=16, n_heads=4, n_kv_heads=2, d_mlp=256, n_ctx=256)
#: data seeds of each stage (the step is added), disjoint from each other, from the vision stage
#: (10**9 and above) and from the held-out scenes (``shapes.HELD_OUT_SEED_BASE`` = 10**8 and above)
STAGE_SEED_BASE = {
    "text": corpus.SEED_BASE,
    "alignment": 5 * 10**7,
    "instruction": 7 * 10**7,
    "replay": 9 * 10**7,
}
ALIGNMENT_PROMPTS = ("describe the image .", "what is in the image ?")


def build_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the corpus's vocabulary, saved to and loaded back from ``directory``."""
    vocab = {token: i for i, token in enumerate(SPECIALS + corpus.vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        add_bos_token=True,
        extra_special_tokens={"image_token": "<image>"},
    )
    fast.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def build_model(tokenizer, seed: int) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=96,
            intermediate_size=192,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=shapes.IMAGE_SIZE,
            patch_size=PATCH,
            projection_dim=96,
        ),
        text_config=TEXT.llama_config(len(tokenizer), tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    return LlavaForConditionalGeneration(config)


def text_batch(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """BOS + document + EOS, right-padded; the loss on every word and the EOS."""
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pad = torch.full_like(ids[:, :1], tokenizer.pad_token_id)
    ids, mask = torch.cat([ids, pad], 1), torch.cat([mask, torch.zeros_like(pad)], 1)
    last = enc["attention_mask"].sum(-1)
    rows = torch.arange(len(texts))
    ids[rows, last] = tokenizer.eos_token_id
    mask[rows, last] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 0] = -100  # BOS is given, not predicted
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def alignment_examples(seed: int, n: int) -> list[shapes.Example]:
    """``n`` image-caption pairs: a caption prompt answered by a description of the scene."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        scene = shapes.random_scene(rng)
        prompt = ALIGNMENT_PROMPTS[int(rng.integers(len(ALIGNMENT_PROMPTS)))]
        answer = shapes.caption(scene, rng) if rng.random() < 0.5 else corpus.describe(scene, rng)
        out.append(shapes.Example(shapes.render(scene), prompt, answer, "caption", tuple(scene)))
    return out


def schedule(steps: int):
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


def run_stage(
    name, model, params, steps, lr, make_batch, log_every=100, evaluate=None, eval_every=0, replay=None
):
    """AdamW with warm-up and cosine decay over ``params``; returns the stage's seconds and last loss."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(steps))
    start, running = time.time(), None
    for step in range(steps):
        model.train()
        model.model.vision_tower.eval()
        loss = model(**make_batch(step)).loss
        if replay is not None:
            weight, make_text_batch = replay
            loss = loss + weight * model(**make_text_batch(step)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % log_every == 0:
            print(f"{name} step {step + 1:5d}  loss {running:.4f}  {time.time() - start:6.0f}s", flush=True)
        if evaluate is not None and eval_every and (step + 1) % eval_every == 0 and step + 1 < steps:
            print(f"  held-out accuracy: {evaluate()}", flush=True)
    model.eval()
    return round(time.time() - start), running


def save(model, processor, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vision-steps", type=int, default=500)
    parser.add_argument("--text-steps", type=int, default=2500)
    parser.add_argument("--alignment-steps", type=int, default=500)
    parser.add_argument("--instruction-steps", type=int, default=2500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--text-lr", type=float, default=2e-3)
    parser.add_argument("--alignment-lr", type=float, default=2e-3)
    parser.add_argument("--instruction-lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument(
        "--stages-dir", type=Path, default=None, help="also save the model after each stage here"
    )
    parser.add_argument(
        "--text-replay",
        type=float,
        default=0.0,
        help="in instruction tuning, add this weight times the text-pretraining loss on a corpus batch "
        "each step (rehearsal of the language model's objective; default 0: none)",
    )
    parser.add_argument(
        "--from-text-stage",
        type=Path,
        default=None,
        help="start from a saved stage1-text model (skips the vision and text stages; for experiments)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.seed >= 19:
        parser.error("--seed must be below 19 (each seed's data seeds span a million steps per stage).")
    if args.threads:
        torch.set_num_threads(args.threads)

    def seeds(stage: str, step: int) -> int:
        return STAGE_SEED_BASE[stage] + args.seed * 1_000_003 + step

    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(args.out)
    processor = build_processor(tokenizer)
    model = build_model(tokenizer, args.seed)
    if args.from_text_stage is not None:
        model = LlavaForConditionalGeneration.from_pretrained(args.from_text_stage)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"demo-phases LLaVA: {n_params / 1e6:.2f}M parameters", flush=True)
    held_out = shapes.examples(seed=shapes.HELD_OUT_SEED_BASE + args.seed, n=400)
    seconds: dict[str, int] = {}
    losses: dict[str, float] = {}
    language_model = [*model.model.language_model.parameters(), *model.lm_head.parameters()]
    projector = list(model.model.multi_modal_projector.parameters())

    vision_accuracy = None
    if args.from_text_stage is None:
        start = time.time()
        vision_accuracy = pretrain_vision(model, processor, args.vision_steps, args.seed)
        seconds["vision"] = round(time.time() - start)
        print(f"vision stage done: held-out patch accuracy {vision_accuracy:.4f}", flush=True)
    model.model.vision_tower.requires_grad_(False)

    if args.from_text_stage is None:
        seconds["text"], losses["text"] = run_stage(
            "text",
            model,
            language_model,
            args.text_steps,
            args.text_lr,
            lambda step: text_batch(tokenizer, corpus.documents(seeds("text", step), args.batch_size)),
        )
    if args.stages_dir:
        save(model, processor, args.stages_dir / "stage1-text")

    for p in language_model:
        p.requires_grad_(False)
    seconds["alignment"], losses["alignment"] = run_stage(
        "alignment",
        model,
        projector,
        args.alignment_steps,
        args.alignment_lr,
        lambda step: training_batch(processor, alignment_examples(seeds("alignment", step), args.batch_size)),
    )
    after_alignment = accuracy(model, processor, held_out)
    print(f"after alignment, held-out accuracy: {after_alignment}", flush=True)
    if args.stages_dir:
        save(model, processor, args.stages_dir / "stage2-alignment")

    for p in language_model:
        p.requires_grad_(True)
    seconds["instruction"], losses["instruction"] = run_stage(
        "instruction",
        model,
        language_model + projector,
        args.instruction_steps,
        args.instruction_lr,
        lambda step: training_batch(
            processor,
            shapes.examples(seed=seeds("instruction", step), n=args.batch_size, kinds=TRAIN_KINDS),
        ),
        replay=(
            (
                args.text_replay,
                lambda step: text_batch(tokenizer, corpus.documents(seeds("replay", step), args.batch_size)),
            )
            if args.text_replay
            else None
        ),
        evaluate=lambda: accuracy(model, processor, held_out),
        eval_every=args.eval_every,
    )
    save(model, processor, args.out)
    if args.stages_dir:
        save(model, processor, args.stages_dir / "stage3-instruction")
    final = accuracy(model, processor, held_out)
    summary = {
        "seed": args.seed,
        "text_config": dataclasses.asdict(TEXT),
        "parameters": n_params,
        "batch_size": args.batch_size,
        "steps": {
            "vision": args.vision_steps,
            "text": args.text_steps,
            "alignment": args.alignment_steps,
            "instruction": args.instruction_steps,
        },
        "lr": {"text": args.text_lr, "alignment": args.alignment_lr, "instruction": args.instruction_lr},
        "threads": torch.get_num_threads(),
        "text_replay": args.text_replay,
        "from_text_stage": str(args.from_text_stage) if args.from_text_stage else None,
        "vision_patch_accuracy": vision_accuracy,
        "final_losses": {k: round(v, 4) for k, v in losses.items()},
        "seconds": seconds,
        "train_seconds": sum(seconds.values()),
        "held_out_accuracy_after_alignment": after_alignment,
        "held_out_accuracy": final,
    }
    (args.out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
