"""Every ```python block of README.md and docs/*.md runs, in order, one namespace per file.

A block may be preceded by HTML comments (invisible on the rendered page):

* ``<!-- doc-context: NAME -->``: before the block, run ``CONTEXTS[NAME]`` below in the file's
  namespace. It defines what a trainer fragment takes as given (the user's model, batch, loss);
  it never defines a name the block itself assigns.
* ``<!-- doc-no-run: REASON -->``: the block is not run. Only for what a CPU box with one process
  cannot run (a GPU, a torch.distributed world, Megatron's pipeline schedule); ``NO_RUN`` lists
  each one with its reason, and a test checks that list against the docs.

A UserWarning or RuntimeWarning raised while a block runs fails it (e.g. torch's "converting a
tensor that requires grad"), except those ``IGNORED_WARNINGS`` lists (third-party notices that do
not concern the snippet); other libraries' deprecation notices are not the snippet's business.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the snippets run on the built-in HF model (pip install 'routereplay[hf]')")

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"((?:<!-- doc-[a-z-]+:[^\n]*-->\n)*)```python\n(.*?)```", re.DOTALL)
_NOTE = re.compile(r"<!-- doc-([a-z-]+): ?(.*?) ?-->")

# (file, first line of the block) -> why it cannot run here.
NO_RUN = {
    ("README.md", "from routereplay import parallel"): "Megatron-Core pipeline schedule on a model-parallel world",
    ("docs/DISTRIBUTED.md", "import routereplay"): "Megatron-Core pipeline schedule on a model-parallel world",
    ("docs/DISTRIBUTED.md", "model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)"): (
        "FSDP2 sharding needs a torch.distributed world"
    ),
}

# Names a fragment takes as given. Small sizes: the built-in test-size model, a few short prompts.
_MODEL = """
import torch
from routereplay.cli.check import TINY_SIZE, build_default_model
torch.manual_seed(0)
policy = build_default_model(TINY_SIZE)                     # the user's HF MoE model
# ... one that ends its answers after a few tokens (EOS logit +3, in every forward alike), so that
# the snippets' max_new_tokens=256 stays a CPU-second
policy.lm_head.register_forward_hook(lambda _m, _args, logits: logits + 3.0 * (torch.arange(logits.shape[-1]) == 1))
_g = torch.Generator().manual_seed(0)
_lens = [3, 5, 4, 6]
prompt_ids = torch.zeros(4, 6, dtype=torch.long)             # left-padded prompts
prompt_mask = torch.zeros(4, 6, dtype=torch.long)
for _b, _n in enumerate(_lens):
    prompt_ids[_b, 6 - _n:] = torch.randint(3, TINY_SIZE.vocab, (_n,), generator=_g)
    prompt_mask[_b, 6 - _n:] = 1
eos_id, pad_id = 1, 0
ppo_epochs = 2
advantages = torch.randn(4)
optimizer = torch.optim.SGD(policy.parameters(), lr=1e-3)

def loss_fn(x, *rest):                                       # the user's loss
    return x.float().mean()
"""
CONTEXTS = {
    # the model, its prompts and loss, attached (README attaches before its trainer snippets)
    "policy": _MODEL + "import routereplay\nhandle = routereplay.attach(policy)\n",
    # the same, not attached yet (the block attaches)
    "model": _MODEL,
    # a padded micro-batch of the rollout: samples `ids`, its tokens and mask
    "micro-batch": """
ids = torch.tensor([0, 2])
batch = rollout.padded(ids)
input_ids, mask = batch["input_ids"], batch["attention_mask"]
fwd = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
""",
    # the whole rollout padded to one width, cut into two micro-batches; its R3 routes in a store
    "micro-batches": """
_width = int(rollout.seq_lens.max())
input_ids = rollout.padded(width=_width)["input_ids"]
micro_batches = [(torch.tensor(i), rollout.padded(i, width=_width)["attention_mask"]) for i in ([0, 2], [1, 3])]
store = RouteStore(handle, rollout.training_trace())
""",
    # a rollout captured from the model (a fragment that starts after generation), with the
    # attached handle or, when the block attaches the model itself, a handle detached again
    "rollout": """
import routereplay
_h = globals().get("handle") or routereplay.attach(policy)
with torch.no_grad(), _h.capture_generation() as _cap:
    _out = policy.generate(prompt_ids, attention_mask=prompt_mask, do_sample=True, max_new_tokens=8)
rollout = _cap.rollout(_out, prompt_attention_mask=prompt_mask)
if "handle" not in globals():
    _h.detach()
""",
    # R3 metrics inputs: the rollout's and the trainer's routes and log-probs of one forward
    "metrics": """
from routereplay.rl.store import token_logprobs as _tlp
_b = rollout.padded()
with torch.no_grad(), handle.record() as _rec:
    _logits = policy(**{k: _b[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits
rollout_trace = rollout.training_trace()
trainer_trace = _rec.trace(attention_mask=_b["attention_mask"])
response_mask = rollout.response_mask()
logp_train = _tlp(_logits, _b["input_ids"])[_b["attention_mask"].bool()]
logp_infer = logp_train + 0.01 * torch.randn_like(logp_train)
""",
    # docs/INTEGRATIONS.md's aux-loss block: a replayed micro-batch of the rollout and a task loss
    "aux-loss": """
model = policy
ids, mask = (rollout.padded([0, 1])[key] for key in ("input_ids", "attention_mask"))
with torch.no_grad(), handle.record() as _rec:
    model(input_ids=ids, attention_mask=mask)
trace = _rec.trace(attention_mask=mask)
k = policy.config.num_experts_per_tok
task_loss, coef = torch.tensor(0.0), 0.01
""",
    # a trace file in the working directory
    "trace-file": """
import torch, routereplay
routereplay.save(routereplay.RoutingTrace(experts=torch.tensor([[[0, 1]], [[2, 3]]], dtype=torch.uint8),
                 cu_seqlens=torch.tensor([0, 2]), layer_ids=(1,), num_experts=8), "trace.rrt")
""",
    # TRL's GRPOTrainer inputs: the example's tokenizer, reward and prompts; settings for one CPU step
    "trl": """
import importlib.util, tempfile
_spec = importlib.util.spec_from_file_location("trl_grpo_r3", ROOT / "examples" / "trl_grpo_r3.py")
_ex = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(_ex)
from datasets import Dataset
from routereplay.cli.check import TINY_SIZE, build_default_model
model = build_default_model(TINY_SIZE)
tokenizer = _ex.build_tokenizer(TINY_SIZE.vocab)
reward = _ex.distinct_tokens
dataset = Dataset.from_dict({"prompt": ["t5 t9 t12", "t7 t3", "t30 t31 t32 t33"] * 2})
your_args = dict(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to=[], save_strategy="no",
                 per_device_train_batch_size=4, num_generations=4, max_completion_length=4, max_steps=1)
""",
    # data-parallel R3 in one process: a world of one rank
    "dp-one-rank": """
batch, world, rank, epoch, micro_batch = list(range(rollout.num_seqs)), 1, 0, 0, 2
chunks = lambda xs, n: [xs[i:i + n] for i in range(0, len(xs), n)]
mask_of = lambda mb: rollout.padded(mb)["attention_mask"]
def loss_of(mb):
    b = rollout.padded(mb)
    return policy(**{k: b[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits.float().mean()
""",
}
IGNORED_WARNINGS = ()


def _blocks():
    for path in DOCS:
        name = path.relative_to(ROOT).as_posix()
        for m in _BLOCK.finditer(path.read_text()):
            notes = dict(_NOTE.findall(m.group(1)))
            line = path.read_text()[: m.start(2)].count("\n") + 1
            yield name, line, notes, m.group(2)


def _files():
    return sorted({name for name, *_ in _blocks()})


@pytest.mark.parametrize("name", _files())
def test_python_blocks_run(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = {"__name__": "__main__", "ROOT": ROOT}
    ran = 0
    for doc, line, notes, code in _blocks():
        if doc != name or "no-run" in notes:
            continue
        assert set(notes) <= {"context"}, f"{doc}:{line}: unknown note {sorted(notes)}"
        with warnings.catch_warnings():
            for category in (UserWarning, RuntimeWarning):  # not deprecation notices of other libraries
                warnings.simplefilter("error", category)
            for category, message in IGNORED_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            for context in notes.get("context", "").split():
                exec(compile(CONTEXTS[context], f"<context {context}>", "exec"), ns)  # noqa: S102
            exec(compile(code, f"{doc}:{line}", "exec"), ns)  # noqa: S102 (the docs' own code)
        ran += 1
    assert ran > 0


def test_no_run_blocks_are_the_listed_ones():
    found = {
        (doc, code.splitlines()[0]): notes["no-run"] for doc, _, notes, code in _blocks() if "no-run" in notes
    }
    assert found == NO_RUN
