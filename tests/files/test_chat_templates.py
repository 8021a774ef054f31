"""streamjax.stream.templates against transformers' `apply_chat_template`.

Hand-written templates in tiny checkpoint directories need no assets; tests marked `real_assets`
use SmolLM2-135M-Instruct's GGUF, with transformers' own GGUF load as the reference tokenizer.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from streamjax.files import chat_templates, gguf, loading
from streamjax.stream import templates

transformers = pytest.importorskip("transformers", reason="transformers is the reference")

# Uses what transformers' environment provides: bos/eos variables, namespace, loop controls, tojson
# (non-ASCII kept), raise_exception, a {% generation %} block, and trim_blocks/lstrip_blocks whitespace.
FEATURE_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(count=0) %}
{% for message in messages %}
    {% if message['role'] == 'system' and not loop.first %}
        {{ raise_exception('the system message must come first') }}
    {% endif %}
    {% set ns.count = ns.count + 1 %}
    {% if message['role'] == 'assistant' %}
[A{{ ns.count }}] {% generation %}{{ message['content'] }}{% endgeneration %}{{ eos_token }}
    {% else %}
[{{ message['role'] | upper }}{{ ns.count }}] {{ message['content'] | tojson }}
    {% endif %}
    {% if message['content'] == 'STOP' %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}[A]{% endif %}"""

CONVERSATIONS = {
    "no system": [
        {"role": "user", "content": "Hello! How are you?"},
        {"role": "assistant", "content": "Fine, thanks.\nAnd you?"},
        {"role": "user", "content": "Café, naïve, 日本語 🙂 — and <|im_start|> inside text."},
    ],
    "system": [
        {"role": "system", "content": "You answer in one line."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "  spaces and\ttabs  \n\n"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Thanks"},
    ],
}


def _tiny_tokenizer_directory(path: pathlib.Path, template: str | None) -> pathlib.Path:
    """A checkpoint directory with a tiny word-level tokenizer saved by transformers (no weights)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "[PAD]": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="[UNK]", pad_token="[PAD]"
    )
    if template is not None:
        tokenizer.chat_template = template
    tokenizer.save_pretrained(path)
    return path


def test_renders_as_transformers_with_every_environment_feature(tmp_path):
    directory = _tiny_tokenizer_directory(tmp_path, FEATURE_TEMPLATE)
    assert (directory / "chat_template.jinja").is_file()  # transformers 5 saves the template there
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(directory)
    template = chat_templates.load_chat_template(str(directory))
    assert template.special_tokens == reference.special_tokens_map
    assert template.origin == str(directory / "chat_template.jinja")
    stopped = [{"role": "user", "content": "STOP"}, {"role": "user", "content": "never rendered"}]
    for messages in [*CONVERSATIONS.values(), stopped]:
        for add_generation_prompt in (True, False):
            expected = reference.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            assert templates.render(template, messages, add_generation_prompt) == expected
    rendered = templates.render(template, CONVERSATIONS["no system"])
    assert rendered.startswith('<s>\n[USER1] "Hello! How are you?"\n[A2] Fine, thanks.\nAnd you?</s>\n')
    assert '"Café, naïve, 日本語 🙂' in rendered and rendered.endswith("[A]")
    assert "never rendered" not in templates.render(template, stopped)


def test_template_errors_name_the_template(tmp_path):
    template = chat_templates.load_chat_template(str(_tiny_tokenizer_directory(tmp_path, FEATURE_TEMPLATE)))
    late_system = [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"}]
    with pytest.raises(ValueError, match=r"chat_template.jinja\) refused the conversation: the system message must"):
        templates.render(template, late_system)
    sneaky = templates.ChatTemplate("{% set ns = namespace() %}{% set ns._x = 1 %}", {}, "sneaky")
    with pytest.raises(Exception, match="underscore"):
        templates.render(sneaky, [])


def test_template_sources_and_their_precedence(tmp_path):
    directory = _tiny_tokenizer_directory(tmp_path, None)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = "config:{{ messages[0]['content'] }}"
    config["eos_token"] = {"content": "</s>", "special": True, "__type": "AddedToken"}  # the older way of writing it
    config_path.write_text(json.dumps(config))
    messages = [{"role": "user", "content": "x"}]
    template = chat_templates.load_chat_template(str(directory))
    assert (templates.render(template, messages), template.special_tokens["eos_token"]) == ("config:x", "</s>")
    assert template.origin == f"chat_template in {config_path}"
    (directory / "chat_template.jinja").write_text("jinja:{{ messages[0]['content'] }}")
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(directory)  # it prefers the .jinja file too
    assert templates.render(chat_templates.load_chat_template(str(directory)), messages) == "jinja:x"
    assert reference.apply_chat_template(messages, tokenize=False) == "jinja:x"
    given = tmp_path / "given.jinja"
    given.write_text("given:{{ eos_token }}")
    assert templates.render(chat_templates.load_chat_template(str(directory), given), messages) == "given:</s>"
    (directory / "chat_template.jinja").unlink()
    config["chat_template"] = [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}]
    config_path.write_text(json.dumps(config))
    assert chat_templates.load_chat_template(str(directory)).text == "d"
    config["chat_template"] = config["chat_template"][:1]
    config_path.write_text(json.dumps(config))
    with pytest.raises(
        chat_templates.MissingChatTemplateError, match=r"a 'default' among the named templates \['tool_use'\]"
    ):
        chat_templates.load_chat_template(str(directory))
    assert chat_templates.load_chat_template(str(directory), given).text == "given:{{ eos_token }}"
    with pytest.raises(FileNotFoundError, match="missing.jinja"):
        chat_templates.load_chat_template(str(directory), tmp_path / "missing.jinja")


def _write_gguf_without_template(path: pathlib.Path) -> pathlib.Path:
    gguf_writer = pytest.importorskip("gguf").GGUFWriter(str(path), "llama")
    gguf_writer.add_tokenizer_model("gpt2")
    gguf_writer.add_token_list(["<unk>", "<s>", "</s>", "a"])
    gguf_writer.add_eos_token_id(2)
    gguf_writer.write_header_to_file()
    gguf_writer.write_kv_data_to_file()
    gguf_writer.write_tensors_to_file()
    gguf_writer.close()
    return path


def test_a_model_without_template_raises_saying_how_to_give_one(tmp_path):
    directory = _tiny_tokenizer_directory(tmp_path / "hf", None)
    with pytest.raises(
        chat_templates.MissingChatTemplateError, match=r"has no chat template .*--config.chat_template=FILE"
    ):
        chat_templates.load_chat_template(str(directory))
    path = _write_gguf_without_template(tmp_path / "plain.gguf")
    with pytest.raises(chat_templates.MissingChatTemplateError, match=r"tokenizer.chat_template of .*plain.gguf"):
        chat_templates.load_chat_template(str(path))
    given = tmp_path / "given.jinja"
    given.write_text("{{ eos_token }}")
    template = chat_templates.load_chat_template(str(path), given)
    assert template.special_tokens == {"eos_token": "</s>"} and templates.render(template, []) == "</s>"


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        (
            [{"role": "user", "content": "hi"}, {"role": "tool", "content": "x"}],
            r"message 1 has role 'tool'; the role must be one of",
        ),
        ([{"role": "user", "content": None}], r"message 0 has content None; the content must be a string"),
        ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], r"message 0 has content \[\{'type'"),
        ([{"role": "user"}], r"message 0 must be a dict with exactly 'role' and 'content'"),
        ([{"role": "user", "content": "hi", "name": "bob"}], r"message 0 must be a dict with exactly"),
        (["hi"], r"message 0 must be a dict"),
        ({"role": "user", "content": "hi"}, r"messages must be a list"),
    ],
)
def test_bad_messages_raise_naming_the_message(messages, message):
    template = templates.ChatTemplate("{{ messages | length }}", {}, "test")
    with pytest.raises(ValueError, match=message):
        templates.render(template, messages)
    with pytest.raises(ValueError, match=message):
        templates.turn_text(template, [], messages)


def test_turn_text_is_the_new_part_of_the_rendering():
    tagged = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
    template = templates.ChatTemplate(tagged + "{% if add_generation_prompt %}<assistant>{% endif %}", {}, "tags")
    user, reply, user_2 = (
        {"role": role, "content": text} for role, text in [("user", "u"), ("assistant", "a"), ("user", "v")]
    )
    assert templates.turn_text(template, [], [user]) == "<user>u</user><assistant>"
    assert templates.turn_text(template, [user, reply], [user_2]) == "<user>v</user><assistant>"
    after_prompt = templates.turn_text(template, [user], [reply, user_2], history_prompted=True)
    assert after_prompt == "a</assistant><user>v</user><assistant>"
    assert templates.turn_text(template, [user], [reply], add_generation_prompt=False) == "<assistant>a</assistant>"


def test_turn_text_refuses_a_template_that_is_not_prefix_stable():
    last_marked = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }};{% endfor %}"
    template = templates.ChatTemplate(last_marked, {}, "last-marked")
    history = [{"role": "user", "content": "a"}]
    with pytest.raises(
        ValueError, match=r"\(last-marked\) is not prefix-stable: .*'LAST a;'.*'a;LAST b;'.*character 0"
    ):
        templates.turn_text(template, history, [{"role": "assistant", "content": "b"}])
    assert templates.turn_text(template, [], history) == "LAST a;"


def test_library_does_not_import_torch(tmp_path):
    directory = _tiny_tokenizer_directory(tmp_path, FEATURE_TEMPLATE)
    code = (
        "import sys; from streamjax.files import chat_templates; from streamjax.stream import templates as c; t = chat_templates.load_chat_template(sys.argv[1]); "
        "c.turn_text(t, [{'role': 'user', 'content': 'a'}], [{'role': 'assistant', 'content': 'b'}]); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code, str(directory)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]


# ---------------------------------------------------------------- real assets (SmolLM2-135M-Instruct Q4_1)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    """(streamjax's template, streamjax's tokenizer, transformers' GGUF tokenizer) of SmolLM2."""
    path = smollm2_gguf
    reference = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return (
        chat_templates.load_chat_template(loading.resolve_model(str(path))),
        gguf.load_gguf_tokenizer(path),
        reference,
    )


@pytest.mark.real_assets
def test_smollm2_renders_as_transformers(smollm2):
    template, _, reference = smollm2
    assert template.text == reference.chat_template and template.special_tokens == reference.special_tokens_map
    for messages in CONVERSATIONS.values():
        for turns in range(1, len(messages) + 1):
            for add_generation_prompt in (True, False):
                expected = reference.apply_chat_template(
                    messages[:turns], tokenize=False, add_generation_prompt=add_generation_prompt
                )
                assert templates.render(template, messages[:turns], add_generation_prompt) == expected
    # Without a system message the template writes its default one first.
    assert templates.render(template, CONVERSATIONS["no system"][:1]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHello! How are you?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert templates.render(template, CONVERSATIONS["system"][:2]).startswith(
        "<|im_start|>system\nYou answer in one line.<|im_end|>\n<|im_start|>user\n"
    )


@pytest.mark.real_assets
def test_smollm2_rendering_encodes_to_transformers_ids(smollm2):
    template, tokenizer, reference = smollm2
    for messages in CONVERSATIONS.values():
        expected = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
        rendered = templates.render(template, messages)
        ids = tokenizer(rendered, add_special_tokens=False).input_ids
        assert ids == expected
        assert ids[-4:] == tokenizer("<|im_start|>assistant\n").input_ids
        # Each <|im_start|> is its one special token (id 1), also the one a user typed (as in transformers).
        assert ids.count(1) == rendered.count("<|im_start|>") >= len(messages) + 1


@pytest.mark.real_assets
def test_smollm2_turn_increments_concatenate_to_the_full_rendering(smollm2):
    template, tokenizer, _ = smollm2
    for messages in CONVERSATIONS.values():
        user_turns = [i for i, message in enumerate(messages) if message["role"] == "user"]
        # Turn 1: everything up to the first user message; later turns: the reply, then the next user message.
        pieces = [templates.turn_text(template, [], messages[: user_turns[0] + 1])]
        for previous, current in zip(user_turns, user_turns[1:]):
            pieces.append(
                templates.turn_text(
                    template, messages[: previous + 1], messages[previous + 1 : current + 1], history_prompted=True
                )
            )
        full = templates.render(template, messages)
        assert "".join(pieces) == full
        assert sum((tokenizer(piece).input_ids for piece in pieces), []) == tokenizer(full).input_ids
        # After a reply (history ends with it), a turn adds the user message and the assistant header only.
        last_user = user_turns[-1]
        increment = templates.turn_text(template, messages[:last_user], messages[last_user : last_user + 1])
        assert increment == f"<|im_start|>user\n{messages[last_user]['content']}<|im_end|>\n<|im_start|>assistant\n"
        assert pieces[1].startswith(messages[user_turns[0] + 1]["content"] + "<|im_end|>\n<|im_start|>user\n")
