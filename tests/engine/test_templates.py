import pytest

from packtune.data.builtin_templates import get_template, render, render_text
from packtune.data.formats import Conversation, Message
from packtune.errors import DataError

SYS = Message("system", "Be brief.")
TURNS = (
    Message("user", "Hi"),
    Message("assistant", "Hello!"),
    Message("user", "2+2?"),
    Message("assistant", "4"),
)


def text(messages, template, **kw):
    return render_text(render(Conversation(tuple(messages)), get_template(template), "f:1", **kw))


def test_alpaca_reference_prompts():
    # The two prompts of Stanford Alpaca's train.py, answer and EOS appended.
    no_input = (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nName a color.\n\n### Response:Blue</s>"
    )
    with_input = (
        "Below is an instruction that describes a task, paired with an input that provides further "
        "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
        "Add the numbers.\n\n### Input:\n2 3\n\n### Response:5</s>"
    )
    assert (
        text([Message("user", "Name a color."), Message("assistant", "Blue")], "alpaca") == "<s>" + no_input
    )
    assert (
        text([Message("user", "Add the numbers.", "2 3"), Message("assistant", "5")], "alpaca")
        == "<s>" + with_input
    )


def test_chat_template_reference_strings():
    assert text(TURNS, "vicuna_v1.1") == (
        "<s>A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions. "
        "USER: Hi ASSISTANT: Hello!</s>USER: 2+2? "
        "ASSISTANT: 4</s>"
    )
    assert text((SYS, *TURNS), "chatml") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        "Hello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>"
    )
    assert text((SYS, *TURNS), "llama2") == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] 2+2? [/INST] 4 </s>"
    )
    assert text(TURNS, "llama2") == "<s>[INST] Hi [/INST] Hello! </s><s>[INST] 2+2? [/INST] 4 </s>"
    assert text((SYS, *TURNS), "llama3") == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
        "\n\nHello!<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
    )
    assert text([Message("user", "Q: 1+1\nA:"), Message("assistant", " 2")], "raw") == "<s>Q: 1+1\nA: 2</s>"


def test_trainable_segments_per_train_on_option():
    tpl = get_template("chatml")
    conv = Conversation((SYS, *TURNS))
    trained = lambda **kw: "".join(s.text for s in render(conv, tpl, "f:1", **kw) if s.trainable)
    assert trained() == "Hello!<|im_end|>4<|im_end|>"
    assert trained(train_on="last") == "4<|im_end|>"
    assert trained(train_on="all") == render_text(render(conv, tpl, "f:1"))


def test_content_cannot_inject_special_tokens():
    segs = render(
        Conversation((Message("user", "say <|im_end|>"), Message("assistant", "ok"))),
        get_template("chatml"),
        "f:1",
    )
    assert [s.text for s in segs if s.special] == ["<|im_start|>", "<|im_end|>", "<|im_start|>", "<|im_end|>"]


def test_user_template_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(
        'prefix = ""\nuser = ">> {content}\\n"\nassistant = "{content}"\nassistant_end = "{eos}"\n'
    )
    assert text([Message("user", "q"), Message("assistant", "a")], str(path)) == ">> q\na</s>"
    path.write_text('usr = ">> {content}"\n')
    with pytest.raises(DataError, match="unknown template key 'usr'"):
        get_template(str(path))
    with pytest.raises(DataError, match="unknown template 'chatlm'"):
        get_template("chatlm")


def test_roles_and_turn_order_are_checked():
    with pytest.raises(DataError, match="f:1: message 0: role 'tool' is not known to template 'chatml'"):
        text([Message("tool", "x"), Message("assistant", "y")], "chatml")
    with pytest.raises(DataError, match="must end with an assistant turn"):
        text([Message("user", "x")], "chatml")
    with pytest.raises(DataError, match="expected a user turn"):
        text([Message("assistant", "x")], "chatml")
