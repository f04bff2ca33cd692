"""Training and scoring as the references do them (issue 24, part 2): each test checks a rule against the
reference named in its docstring, and failed before the fix."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import satcli.training.scst
import satcli.training.supervised
from models.decoding import sample
from satcli.commands.preprocess import run as preprocess
from satcli.data.preprocess import PreprocessOptions
from satcli.data.store import DatasetKind, StoredDataset
from satcli.data.vocab import END, END_ID, SPECIALS, UNK_ID, Vocabulary
from satcli.scoring.metrics import CiderD
from satcli.training import TrainOptions
from satcli.training.scst import CiderReward, Scst, scst_epoch
from tests.helpers import random_features, tiny_captioner

# --- 1. SCST's reward scores the end token (Rennie et al. 2017, appendix; ruotianluo/self-critical.pytorch) ------

WORDS = ["a", "dog", "on", "mat", "cat", "sofa", "red", "ball"]
VOCAB = Vocabulary([*SPECIALS, *WORDS])
CORPUS = [
    [["a", "dog", "on", "a", "mat"], ["a", "dog", "on", "a", "red", "mat"]],
    [["a", "cat", "on", "a", "sofa"], ["a", "cat", "on", "a", "red", "sofa"]],
    [["a", "red", "ball"]],
]


def ids(words: list[str], end: bool = True) -> list[int]:
    return [VOCAB.id(w) for w in words] + ([END_ID] if end else [])


def reference_cider(corpus, candidates: dict[int, str]) -> dict[int, float]:
    """CIDEr-D the way ruotianluo's ``get_self_critical_reward`` calls it: every string ends with the end token
    (``array_to_str`` keeps the 0 it stops at; ``prepro_ngrams`` adds ``<eos>`` to every reference before the
    document frequencies), and the document frequencies come from the whole training corpus. pycocoevalcap's
    ``Cider`` takes its frequencies from the references it is given, so it is given the whole corpus."""
    from pycocoevalcap.cider.cider import Cider

    gts = {i: [" ".join([*ref, END]) for ref in refs] for i, refs in enumerate(corpus)}
    res = {i: [candidates.get(i, "a")] for i in gts}
    _, per_image = Cider().compute_score(gts, res)
    return {i: float(per_image[i]) for i in candidates}


def test_the_scst_reward_is_cider_d_with_the_end_token_on_both_sides():
    reward = CiderReward(CORPUS)
    truncated, whole = ["a", "dog", "on", "a"], ["a", "dog", "on", "a", "mat"]
    rewards = reward.rewards([[ids(truncated), ids(whole)]], [ids(["a", "cat"])], [0], VOCAB)
    expected = reference_cider(CORPUS, {0: " ".join([*truncated, END])})[0]
    assert rewards.samples[0, 0] == pytest.approx(expected, rel=1e-9)
    assert rewards.samples[0, 1] == pytest.approx(reference_cider(CORPUS, {0: " ".join([*whole, END])})[0], rel=1e-9)
    # without the end token the truncated "a dog on a" keeps every n-gram of "a dog on a mat" it has; with it,
    # the n-grams that end the sentence are missing, so it scores lower than before
    without = CiderD(CORPUS).scores([truncated], [CORPUS[0]])[0]
    assert rewards.samples[0, 0] < without - 0.1
    assert rewards.samples[0, 1] - rewards.samples[0, 0] > 1.0


def test_a_caption_cut_at_max_length_gets_no_end_token_in_its_reward():
    """ruotianluo's ``array_to_str`` adds the end token only where the sequence wrote one (its 0)."""
    reward = CiderReward(CORPUS)
    cut = ["a", "dog", "on", "a", "mat"]
    rewards = reward.rewards([[ids(cut, end=False)]], [ids(cut, end=False)], [0], VOCAB)
    assert rewards.samples[0, 0] == pytest.approx(reference_cider(CORPUS, {0: " ".join(cut)})[0], rel=1e-9)


# --- 4. <unk> is banned in validation, the SCST baseline and SCST sampling, as in caption and evaluate -----------

def unk_loving_model(vocab_size: int = 12):
    """A tiny captioner whose every step prefers <unk> by far (then <end> and words, in random order)."""
    torch.manual_seed(0)
    model = tiny_captioner(vocab_size=vocab_size)
    with torch.no_grad():
        model.decoder.out.bias[UNK_ID] += 50.0
    return model


def has_unk(tokens) -> bool:
    return UNK_ID in list(tokens)


def test_the_unk_loving_model_really_writes_unk_when_allowed():
    model = unk_loving_model()
    drawn = sample(model, random_features(model, 2), n_samples=3, max_length=5)
    assert (drawn.tokens == UNK_ID).float().mean() > 0.5  # so the tests below can fail


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    preprocess(PreprocessOptions(dataset=DatasetKind.shapes, data_root=root, n_train=8, n_val=4, n_test=4,
                                 image_size=64, min_word_freq=1))
    return StoredDataset.open(root, "shapes")


def recording(monkeypatch, module, name="decode_split"):
    """Wrap ``module.name`` (the real function) so the test sees what it returned."""
    seen = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(module, name, spy)
    return seen


def test_validation_never_writes_unk(tiny_store, monkeypatch):
    model = unk_loving_model(len(tiny_store.vocab))
    features = random_features(model, tiny_store.n_images("val")).numpy()
    seen = recording(monkeypatch, satcli.training.supervised)
    satcli.training.supervised.validate(model, tiny_store, "val", tiny_store.vocab, torch.device("cpu"), features,
                                        beam_size=1, max_length=6)
    results = [r for (decoded,) in seen for r in decoded.results]
    assert len(results) == tiny_store.n_images("val")
    assert not any(has_unk(r.tokens) for r in results)


def test_scst_validation_never_writes_unk(monkeypatch):
    model = unk_loving_model()
    seen = recording(monkeypatch, satcli.training.scst)
    run = SimpleNamespace(model=model, options=TrainOptions(dataset="x", val_beam_size=2, val_max_length=6),
                          device=torch.device("cpu"), vocab=Vocabulary([*SPECIALS, *(f"w{i}" for i in range(8))]))
    fake = SimpleNamespace(run=run, val_features=random_features(model, 3).numpy(), val_refs=[[["w1"]]] * 3)
    Scst.score(fake)
    (decoded,) = seen[0]
    assert len(decoded.results) == 3 and not any(has_unk(r.tokens) for r in decoded.results)


class RecordingReward(CiderReward):
    def __init__(self, references):
        super().__init__(references)
        self.sampled, self.greedy = [], []

    def rewards(self, sampled, greedy, rows, vocab):
        self.sampled.extend(sampled)
        self.greedy.extend(greedy)
        return super().rewards(sampled, greedy, rows, vocab)


def test_scst_sampling_and_its_greedy_baseline_never_write_unk():
    model = unk_loving_model()
    vocab = Vocabulary([*SPECIALS, *(f"w{i}" for i in range(8))])
    reward = RecordingReward([[["w1", "w2"]]] * 4)
    options = TrainOptions(dataset="x", batch_size=2, epochs=1, scst_samples=3, val_max_length=6)
    optimizer = torch.optim.SGD(model.decoder.parameters(), lr=0.0)
    scst_epoch(model, optimizer, random_features(model, 4).numpy(), reward, vocab, options, 0, torch.device("cpu"))
    assert len(reward.greedy) == 4 and len(reward.sampled) == 4
    assert not any(has_unk(g) for g in reward.greedy)
    assert not any(has_unk(s) for per_image in reward.sampled for s in per_image)


def test_the_python_api_bans_unk_by_default_like_caption(tmp_path):
    from PIL import Image

    import satcli
    from satcli.formats.checkpoint import save_checkpoint

    model = unk_loving_model()
    vocab = Vocabulary([*SPECIALS, *(f"w{i}" for i in range(8))])
    checkpoint = save_checkpoint(tmp_path / "unk.pt", model, vocab)
    picture = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(picture)
    pipeline = satcli.load(checkpoint, device="cpu")
    (row,) = pipeline.caption([picture], beam_size=2, max_length=6)
    assert row["error"] is None and "<unk>" not in row["words"]
    (allowed,) = pipeline.caption([picture], beam_size=2, max_length=6, banned_ids=())
    assert "<unk>" in allowed["words"]  # the model does prefer it


# --- 3. Fine-tuning keeps BatchNorm statistics frozen ---------------------------------------------------------------

def batchnorm_statistics(state: dict) -> dict:
    return {k: v.clone() for k, v in state.items()
            if k.startswith("encoder.") and (k.endswith("running_mean") or k.endswith("running_var"))}


def test_model_train_leaves_the_tuned_blocks_batchnorm_in_eval_mode():
    model = tiny_captioner(image_size=64)
    model.encoder.set_fine_tuning(2)
    model.train()
    model.decoder.train()
    batchnorms = [m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    tuned = [m for m in batchnorms if m.weight.requires_grad]
    assert tuned and len(tuned) < len(batchnorms)  # the top blocks' BatchNorm layers, scale and shift trainable
    assert not any(m.training for m in batchnorms)
    before = batchnorm_statistics(model.state_dict())
    for _ in range(2):
        features = model.encode(torch.randn(3, 3, 64, 64))
        out = model(features, torch.tensor([[1, 5, 6, 2]] * 3), torch.tensor([3, 3, 3]))
        out.logprobs.sum().backward()
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
        model.train()  # what every training epoch does
    after = batchnorm_statistics(model.state_dict())
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.weight.grad is not None for m in tuned)  # scale and shift still learn


def test_a_fine_tuning_run_keeps_the_pretrained_batchnorm_statistics(tmp_path, monkeypatch):
    from models.captioner import Captioner, CaptionerConfig
    from satcli.formats.checkpoint import read_checkpoint
    from satcli.training import train

    monkeypatch.setenv("SATCLI_STATE_DIR", str(tmp_path / "state"))
    data = tmp_path / "data"
    preprocess(PreprocessOptions(dataset=DatasetKind.shapes, data_root=data, n_train=12, n_val=4, n_test=0,
                                 image_size=64, min_word_freq=1))
    result = train(TrainOptions(dataset="shapes", data_root=data, out=tmp_path / "run", epochs=1, image_size=64,
                                embed_dim=16, attention_dim=16, decoder_dim=24, dropout=0.0, batch_size=4,
                                fine_tune_encoder=True, fine_tune_blocks=2, device="cpu"))
    checkpoint = read_checkpoint(result.last)
    pretrained = Captioner(CaptionerConfig.from_dict(checkpoint["config"]), pretrained_encoder=True).state_dict()
    tuned = checkpoint["state_dict"]
    expected = batchnorm_statistics(pretrained)
    assert expected and all(torch.equal(tuned[k], expected[k]) for k in expected)
    # the run did fine-tune: the top block's convolutions moved
    moved = [k for k in pretrained if k.startswith("encoder.") and k.endswith("weight")
             and not torch.equal(tuned[k], pretrained[k])]
    assert moved


# --- 2. --objects on COCO is Rohrbach et al.'s CHAIR (LisaAnne/Hallucination, utils/chair.py) ----------------------

# Per image: COCO instance labels, reference captions, the generated caption. What CHAIR counts, worked out by hand
# from the reference's rules (synonyms.txt; double words such as "baby elephant" -> elephant; ground truth =
# instance labels + objects named in the reference captions):
#   1. "baby elephant" is one elephant, not a person and an elephant: 1 mention, 0 hallucinated
#   2. man -> person, named by the references though no box has it; table -> dining table; pizza: 3 mentions, 0
#   3. "glass" is no COCO word (only "wine glass" is); cup; table: 2 mentions, 0
#   4. "bat" and "board" are no COCO words (only "baseball bat", "surfboard"); bird: 1 mention, 0
#   5. cat; bed (named by the references); dog, hallucinated: 3 mentions, 1
# CHAIR-i = 1 / 10, CHAIR-s = 1 / 5.
CHAIR_CASES = [
    (["elephant"], ["an adult elephant and a baby elephant", "two elephants in a field"],
     "a baby elephant walking in the grass"),
    (["dining table", "pizza"], ["a man eating a pizza at a table", "a man with a pizza"],
     "a man sitting at a table with a pizza"),
    (["dining table", "cup"], ["a glass of water on a table", "a cup on a wooden table"],
     "a glass of water and a cup on a table"),
    (["bird"], ["a bird sitting on a wooden board", "a small bird on a plank"], "a bat on a board near a bird"),
    (["cat"], ["a cat sleeping on a bed", "a cat lying on a blanket"], "a cat on a bed next to a dog"),
]


def coco_lexicon():
    from satcli.data.instances import SYNONYMS, category_words
    from satcli.scoring.objects import build_lexicon

    return build_lexicon([[{"label": name, "words": category_words(name)} for name in SYNONYMS]])


def test_chair_on_coco_follows_the_reference_rules():
    from satcli.data.text import tokenize
    from satcli.scoring.objects import mentions, object_scores, present_objects

    lexicon = coco_lexicon()
    items = [(tokenize(caption), present_objects(labels, [tokenize(r) for r in refs], lexicon))
             for labels, refs, caption in CHAIR_CASES]
    assert [mentions(tokens, lexicon) for tokens, _ in items] == [
        ["elephant"], ["person", "dining table", "pizza"], ["cup", "dining table"], ["bird"],
        ["cat", "bed", "dog"]]
    scores = object_scores(items, lexicon)
    assert (scores.n_mentions, scores.n_hallucinated) == (10, 1)
    assert scores.chair_i == pytest.approx(1 / 10) and scores.chair_s == pytest.approx(1 / 5)


def test_baby_and_adult_name_a_person_only_when_no_animal_follows():
    from satcli.data.text import tokenize
    from satcli.scoring.objects import mentions

    lexicon = coco_lexicon()
    assert mentions(tokenize("a baby dog and two adult giraffes"), lexicon) == ["dog", "giraffe"]
    assert mentions(tokenize("a baby sitting next to a dog"), lexicon) == ["person", "dog"]


# --- 6. --coco follows the official protocol (pycocoevalcap's COCOEvalCap) ----------------------------------------

RAW_REFERENCES = [
    ["A man in a red T-shirt stands on the grass.", "A man's shirt is red; he's standing on a lawn."],
    ["Two dogs run across a wide, open field!", "Two brown dogs running in the grass"],
    ["A well-dressed woman holds an umbrella.", "A woman under a black umbrella"],
]
CAPTIONS = [["a", "man", "in", "a", "red", "t", "shirt", "stands", "on", "the", "grass"],
            ["two", "dogs", "run", "across", "a", "wide", "field"],
            ["a", "woman", "holds", "an", "umbrella"]]


def official_coco_eval(references: list[list[str]], captions: list[str], monkeypatch) -> dict[str, float]:
    """pycocoevalcap's COCOEvalCap.evaluate itself, on raw references and captions (SPICE left out: it needs a
    download)."""
    import pycocoevalcap.eval
    from pycocoevalcap.eval import COCOEvalCap

    class NoSpice:
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(pycocoevalcap.eval, "Spice", NoSpice)
    gts = SimpleNamespace(imgToAnns={i: [{"image_id": i, "caption": c} for c in refs]
                                     for i, refs in enumerate(references)},
                          getImgIds=lambda: list(range(len(references))))
    res = SimpleNamespace(imgToAnns={i: [{"image_id": i, "caption": c}] for i, c in enumerate(captions)})
    evaluator = COCOEvalCap(gts, res)
    evaluator.evaluate()
    names = {"Bleu_1": "bleu1", "Bleu_2": "bleu2", "Bleu_3": "bleu3", "Bleu_4": "bleu4", "METEOR": "meteor",
             "ROUGE_L": "rouge_l", "CIDEr": "cider_d"}
    return {ours: evaluator.eval[theirs] for theirs, ours in names.items()}


def test_coco_metrics_are_the_official_evaluations_on_the_raw_references(monkeypatch):
    from satcli.scoring.evaluate import coco_scores
    from satcli.scoring.metrics import coco_unavailable

    if coco_unavailable() is not None:
        pytest.skip(coco_unavailable())
    expected = official_coco_eval(RAW_REFERENCES, [" ".join(c) for c in CAPTIONS], monkeypatch)
    got = coco_scores(RAW_REFERENCES, CAPTIONS).scores
    assert got == pytest.approx(expected, rel=1e-6)
    # the vocabulary protocol is another number, so which one was used matters
    other = coco_scores(RAW_REFERENCES, CAPTIONS, references="vocabulary").scores
    assert other["cider_d"] != pytest.approx(expected["cider_d"], rel=1e-3)


def test_the_report_and_the_table_say_which_coco_protocol_was_used(tiny_store, tmp_path):
    import json

    from satcli.formats.checkpoint import save_checkpoint
    from satcli.scoring.evaluate import EvaluateOptions, evaluate

    torch.manual_seed(0)
    model = tiny_captioner(vocab_size=len(tiny_store.vocab), image_size=64)
    checkpoint = save_checkpoint(tmp_path / "m.pt", model, tiny_store.vocab)
    result = evaluate(EvaluateOptions(dataset="shapes", data_root=tiny_store.root.parent, model=checkpoint, coco=True,
                                      java=False, max_length=6, out=tmp_path / "eval", device="cpu"))
    coco = json.loads(result.report.read_text())["coco"]
    assert coco["references"] == "official" and "raw reference captions" in coco["protocol"]
    assert "raw reference captions through the PTB tokenizer" in str(result.table().caption)


# --- 5. caption and evaluate decode at one precision: the same picture gets the same caption ------------------------

def caption_and_evaluate(store, folder, device: str):
    """The test split's captions from ``satcli evaluate`` (cached features) and from ``satcli.load().caption`` on
    the very same pictures (the stored JPEGs written out as files), as {path: (tokens, sum_logprob)}."""
    import pyarrow.parquet as pq

    import satcli
    from models.captioner import Captioner
    from satcli.formats.checkpoint import save_checkpoint
    from satcli.scoring.evaluate import EvaluateOptions, evaluate
    from tests.helpers import tiny_config

    torch.manual_seed(0)
    model = Captioner(tiny_config(vocab_size=len(store.vocab), image_size=64, encoder="efficientnet-lite0"),
                      pretrained_encoder=True)
    with torch.no_grad():
        for parameter in model.decoder.parameters():
            parameter.mul_(2.0)  # captions that depend on the picture
    checkpoint = save_checkpoint(folder / "model.pt", model, store.vocab)
    result = evaluate(EvaluateOptions(dataset=store.name, data_root=store.root.parent, model=checkpoint,
                                      split="test", max_length=8, out=folder / "eval", device=device))
    evaluated = pq.read_table(result.beams[0].predictions).to_pydict()
    table = store.read("test", ["path", "image"]).to_pydict()
    files = []
    for i, data in enumerate(table["image"]):
        files.append(folder / f"{i}.jpg")
        files[-1].write_bytes(data)
    rows = satcli.load(checkpoint, device=device).caption(files, beam_size=3, max_length=8)
    by_path = dict(zip(table["path"], rows, strict=True))
    return ({p: (t, s) for p, t, s in zip(evaluated["path"], evaluated["tokens"], evaluated["sum_logprob"],
                                          strict=True)},
            {p: (r["words"], r["sum_logprob"]) for p, r in by_path.items()})


def assert_same_captions(evaluated, captioned):
    assert evaluated.keys() == captioned.keys()
    for path, (tokens, sum_logprob) in evaluated.items():
        assert captioned[path][0] == tokens, path
        assert captioned[path][1] == pytest.approx(sum_logprob, abs=1e-6), path


def test_caption_and_evaluate_give_the_same_image_the_same_caption(tiny_store, tmp_path):
    evaluated, captioned = caption_and_evaluate(tiny_store, tmp_path, "cpu")
    assert len({tuple(t) for t, _ in evaluated.values()}) > 1  # captions that depend on the picture
    assert_same_captions(evaluated, captioned)


@pytest.mark.cuda
def test_caption_and_evaluate_agree_on_cuda(tiny_store, tmp_path, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    monkeypatch.setenv("SATCLI_GPU_JPEG", "0")  # the same JPEG decoder (Pillow) as evaluate's store reader
    evaluated, captioned = caption_and_evaluate(tiny_store, tmp_path, "cuda")
    assert_same_captions(evaluated, captioned)


# --- 7. --feature-flips reads the features of the mirrored picture ------------------------------------------------

def test_flipped_captions_read_the_encoders_features_of_the_mirrored_picture(tiny_store):
    """What fine-tuning does to pixels (flip the picture, swap left/right in the words), the cache must give:
    the encoder's output on the mirrored image, not the picture's grid mirrored cell by cell."""
    from models.data import DataConfig, image_to_tensor
    from satcli.data.features import cached_features, encode_images
    from satcli.data.views import FLIP_VIEW
    from satcli.training.batches import CaptionTable, FeatureFlips, feature_batches, flip_table
    from satcli.training.distributed import Ranks

    torch.manual_seed(0)
    model = tiny_captioner(vocab_size=len(tiny_store.vocab), image_size=64).eval()
    device = torch.device("cpu")
    plain = cached_features(tiny_store, "train", model, device)
    mirrored = cached_features(tiny_store, "train", model, device, view=FLIP_VIEW)
    data = DataConfig.for_config(model.config)
    pictures = torch.stack([image_to_tensor(tiny_store.decode_image(b), data)
                            for b in tiny_store.read("train", ["image"]).column("image").to_pylist()])
    with torch.inference_mode():
        expected = encode_images(model, pictures.flip(-1))
    torch.testing.assert_close(torch.from_numpy(np.asarray(mirrored, np.float32)), expected, rtol=0, atol=1e-5)

    table = CaptionTable.from_store(tiny_store, "train")
    vocab = tiny_store.vocab
    flips = FeatureFlips.for_epoch(mirrored, flip_table(vocab), len(table), seed=0, epoch=0)
    plan = [torch.arange(len(table))]
    (grids, tokens, _, _, _), = feature_batches(plain, table, plan, Ranks(0, 1), flips)
    rows = table.image.numpy()
    chosen = flips.chosen.numpy()
    assert 0 < chosen.sum() < len(table)
    torch.testing.assert_close(grids[chosen], expected[rows[chosen]], rtol=0, atol=1e-5)
    torch.testing.assert_close(grids[~chosen], torch.from_numpy(np.asarray(plain, np.float32))[rows[~chosen]])
    left, right = vocab.id("left"), vocab.id("right")
    original = table.tokens[:, : tokens.shape[1]]
    said_left, said_right = (original == left)[chosen], (original == right)[chosen]
    assert said_left.any() and (tokens[chosen][said_left] == right).all()
    assert said_right.any() and (tokens[chosen][said_right] == left).all()


def test_evaluate_coco_references_reach_the_evaluation(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import satcli.commands.evaluate
    from satcli.cli import app

    received = []

    def run(options):
        received.append(options)
        raise KeyboardInterrupt  # the options are all this test needs

    monkeypatch.setattr(satcli.commands.evaluate, "run", run)
    base = ["evaluate", "--dataset", "shapes", "--data-root", str(tmp_path), "--coco"]
    CliRunner().invoke(app, base)
    CliRunner().invoke(app, [*base, "--coco-references", "vocabulary"])
    assert [o.coco_references for o in received] == ["official", "vocabulary"]
    bad = CliRunner().invoke(app, [*base, "--coco-references", "nope"])
    assert bad.exit_code != 0 and len(received) == 2
