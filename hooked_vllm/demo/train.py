"""Train the demo VLM from scratch on the synthetic shapes task (CPU, ~13 minutes on 2 cores).

    python -m hooked_vllm.demo.train --out hooked_vllm/demo/model [--steps 12000] [--seed 0]

Two stages, as LLaVA is built: (1) the vision tower is pretrained alone to name what each patch
holds (a per-patch linear classifier, discarded afterwards: our stand-in for a pretrained CLIP);
(2) with the tower frozen, the projector and the language model learn the questions and captions.

Writes ``config.json`` + ``model.safetensors`` + tokenizer + processor files loadable with
``HookedVLM.from_pretrained(out)``, and prints held-out accuracy per question kind.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from hooked_vllm.demo import shapes
from hooked_vllm.tiny_models import TinyTextConfig

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
TRAIN_KINDS = (*shapes.QUESTION_KINDS, "caption")  # captions: dense colour-shape supervision
VISION_SEED_BASE = 10**9  # stage-1 data seeds, disjoint from stage 2's and the held-out ones
PATCH = 16  # a 4 x 4 grid of 16-px patches: each patch embedding sees a whole part of a shape


def data_seed(seed: int, step: int) -> int:
    """The data seed of a training step: one range of a million steps per ``--seed`` (the vision
    stage adds ``VISION_SEED_BASE``; held-out data starts at ``shapes.HELD_OUT_SEED_BASE``)."""
    return seed * 1_000_003 + step


def build_tokenizer(directory: Path) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the task's vocabulary, saved to and loaded back from ``directory``."""
    vocab = {token: i for i, token in enumerate(SPECIALS + shapes.vocabulary())}
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
        text_config=TinyTextConfig(
            d_model=128, n_layers=6, n_heads=4, n_kv_heads=2, d_mlp=256, n_ctx=256
        ).llama_config(len(tokenizer), tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    return LlavaForConditionalGeneration(config)


def build_processor(tokenizer) -> LlavaProcessor:
    size = shapes.IMAGE_SIZE
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def training_batch(processor, batch: list[shapes.Example]) -> dict[str, torch.Tensor]:
    """Prompt + answer + EOS, right-padded; the loss is on the answer words and EOS only
    (one word for questions, every word of a caption)."""
    texts = [TEMPLATE.format(question=ex.question) + f" {ex.answer}" for ex in batch]
    inputs = processor(
        images=[ex.image for ex in batch], text=texts, return_tensors="pt", padding=True, padding_side="right"
    )
    eos = torch.full_like(inputs["input_ids"][:, :1], processor.tokenizer.pad_token_id)
    input_ids = torch.cat([inputs["input_ids"], eos], dim=1)
    mask = torch.cat([inputs["attention_mask"], torch.zeros_like(eos)], dim=1)
    last = inputs["attention_mask"].sum(-1)  # index where EOS goes (right padding)
    rows = torch.arange(len(batch))
    input_ids[rows, last] = processor.tokenizer.eos_token_id
    mask[rows, last] = 1
    labels = torch.full_like(input_ids, -100)
    for row, ex in enumerate(batch):
        start = int(last[row]) - len(ex.answer.split())
        labels[row, start : int(last[row]) + 1] = input_ids[row, start : int(last[row]) + 1]
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "pixel_values": inputs["pixel_values"],
        "labels": labels,
    }


def vision_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The image features LLaVA projects (layer ``vision_feature_layer``, CLS dropped)."""
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    return hidden[model.config.vision_feature_layer][:, 1:]


def pretrain_vision(model, processor, steps: int, seed: int, lr: float = 2e-3, batch_size: int = 64) -> float:
    """Stage 1: train the vision tower to say what every patch holds, colour and shape as two linear
    read-outs (so the features are compositional, as a pretrained CLIP's are; a single 15-way
    colour x shape classifier gives entangled prototypes that the language model binds poorly).

    Returns the per-object patch accuracy (colour and shape both right) on 256 held-out images.
    """
    tower = model.model.vision_tower
    width = model.config.vision_config.hidden_size
    colour_head = torch.nn.Linear(width, 1 + len(shapes.COLOURS))  # 0: background
    shape_head = torch.nn.Linear(width, 1 + len(shapes.SHAPES))
    params = [*tower.parameters(), *colour_head.parameters(), *shape_head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

    def patch_batch(batch_seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng(batch_seed)
        scenes = [shapes.random_scene(rng) for _ in range(n)]
        pixels = processor.image_processor([shapes.render(s) for s in scenes], return_tensors="pt")
        colour, shape = torch.tensor([shapes.patch_labels(s) for s in scenes]).unbind(1)  # [n, cell] each
        return pixels["pixel_values"], colour, shape

    def losses(features, colour, shape) -> torch.Tensor:
        cross_entropy = torch.nn.functional.cross_entropy
        return cross_entropy(colour_head(features).flatten(0, 1), colour.flatten()) + cross_entropy(
            shape_head(features).flatten(0, 1), shape.flatten()
        )

    start = time.time()
    tower.train()
    for step in range(steps):
        pixels, colour, shape = patch_batch(VISION_SEED_BASE + data_seed(seed, step), batch_size)
        loss = losses(vision_features(model, pixels), colour, shape)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 100 == 0:
            elapsed = time.time() - start
            print(f"vision step {step + 1:4d}  loss {loss.item():.4f}  {elapsed:4.0f}s", flush=True)
    tower.eval()
    with torch.no_grad():
        pixels, colour, shape = patch_batch(VISION_SEED_BASE - 1 - seed, 256)
        features = vision_features(model, pixels)
        right = (colour_head(features).argmax(-1) == colour) & (shape_head(features).argmax(-1) == shape)
    return right[colour > 0].float().mean().item()


@torch.no_grad()
def answer_hits(model, processor, examples: list[shapes.Example], batch_size: int = 64) -> list[bool]:
    """Whether the greedy next token is the answer word, per example (HF model, left padding)."""
    model.eval()
    hits: list[bool] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        inputs = processor(
            images=[ex.image for ex in chunk],
            text=[TEMPLATE.format(question=ex.question) for ex in chunk],
            return_tensors="pt",
            padding=True,
            padding_side="left",
        )
        mask = inputs["attention_mask"]
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        logits = model(**inputs, position_ids=positions).logits[:, -1]
        predicted = processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
        hits += [word == ex.answer for ex, word in zip(chunk, predicted)]
    return hits


def accuracy(model, processor, examples: list[shapes.Example]) -> dict[str, float]:
    """Greedy next-token accuracy of the answer word, per question kind."""
    by_kind: dict[str, list[bool]] = {}
    for ex, hit in zip(examples, answer_hits(model, processor, examples)):
        by_kind.setdefault(ex.kind, []).append(hit)
    return {kind: sum(v) / len(v) for kind, v in sorted(by_kind.items())}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "model")
    parser.add_argument("--steps", type=int, default=12_000, help="stage 2 (language) steps")
    parser.add_argument(
        "--vision-steps",
        type=int,
        default=None,
        help="stage 1 (vision) steps; 0 skips it (default: 500, or 0 with --init-from)",
    )
    parser.add_argument(
        "--freeze-vision",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the vision tower fixed in stage 2 (as LLaVA-1.5 does)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=2000)
    parser.add_argument(
        "--init-from", type=Path, default=None, help="continue from a saved model (a second training phase)"
    )
    parser.add_argument(
        "--data-offset", type=int, default=0, help="first step's data seed (use a fresh range per phase)"
    )
    args = parser.parse_args()
    if args.vision_steps is None:
        args.vision_steps = 0 if args.init_from is not None else 500
    last_seed = data_seed(args.seed, args.data_offset + args.steps)
    if last_seed >= shapes.HELD_OUT_SEED_BASE:
        parser.error(
            f"--seed {args.seed} with --data-offset {args.data_offset} and --steps {args.steps} would "
            f"train on data seeds up to {last_seed}, into the held-out range "
            f"(>= {shapes.HELD_OUT_SEED_BASE}); use a seed below 99 or fewer steps."
        )

    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(args.out)
    processor = build_processor(tokenizer)
    if args.init_from is not None:
        model = LlavaForConditionalGeneration.from_pretrained(args.init_from)
    else:
        model = build_model(tokenizer, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"demo LLaVA: {n_params / 1e6:.2f}M parameters; {args.steps} steps of {args.batch_size}", flush=True
    )
    start = time.time()
    vision_accuracy = None
    if args.vision_steps > 0:
        vision_accuracy = pretrain_vision(model, processor, args.vision_steps, args.seed)
        print(f"stage 1 done: held-out patch accuracy {vision_accuracy:.4f}", flush=True)
    if args.freeze_vision:
        model.model.vision_tower.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    held_out = shapes.examples(seed=shapes.HELD_OUT_SEED_BASE + args.seed, n=400)
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.01)
    warmup = max(1, args.steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    running = None
    for step in range(args.steps):
        model.train()
        if args.freeze_vision:
            model.model.vision_tower.eval()
        batch = training_batch(
            processor,
            shapes.examples(
                seed=data_seed(args.seed, args.data_offset + step), n=args.batch_size, kinds=TRAIN_KINDS
            ),
        )
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if (step + 1) % 50 == 0:
            print(f"step {step + 1:5d}  loss {running:.4f}  {time.time() - start:6.0f}s", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            print(f"  held-out accuracy: {accuracy(model, processor, held_out)}", flush=True)

    model.eval()
    model.save_pretrained(args.out, safe_serialization=True)
    processor.save_pretrained(args.out)
    final = accuracy(model, processor, held_out)
    summary = {
        "seed": args.seed,
        "init_from": str(args.init_from) if args.init_from else None,
        "data_offset": args.data_offset,
        "vision_steps": args.vision_steps,
        "vision_patch_accuracy": vision_accuracy,
        "freeze_vision": args.freeze_vision,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "parameters": n_params,
        "train_seconds": round(time.time() - start),
        "held_out_accuracy": final,
    }
    (args.out / "training_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
