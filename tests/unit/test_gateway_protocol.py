"""Request parsing and validation at the edge: every refusal names the field to change."""
import pytest

from services.gateway.auth import Authenticator, Tenant, TokenBucket, load_keys
from services.gateway.errors import APIError
from services.gateway.protocol import parse_chat, parse_completion


def refused(parse, body) -> APIError:
    with pytest.raises(APIError) as ei:
        parse(body)
    assert ei.value.status == 400
    return ei.value


def test_completion_defaults_and_mapping():
    r = parse_completion({"model": "tiny", "prompt": "hi", "stop": "x", "temperature": 0, "logprobs": 2,
                          "logit_bias": {"5": 3}, "stream": True, "stream_options": {"include_usage": True}})
    assert r.prompt == "hi" and r.prompt_token_ids is None
    assert r.sampling == {"temperature": 0.0, "stop": ["x"], "logit_bias": {5: 3.0}, "max_tokens": 16, "logprobs": 2}
    assert r.stream and r.include_usage and r.n == 1


def test_completion_token_prompt_forms():
    assert parse_completion({"model": "m", "prompt": [1, 2, 3]}).prompt_token_ids == [1, 2, 3]
    assert parse_completion({"model": "m", "prompt": [[4, 5]]}).prompt_token_ids == [4, 5]
    assert parse_completion({"model": "m", "prompt": ["one"]}).prompt == "one"
    assert parse_completion({"model": "m", "prompt_token_ids": [7]}).prompt_token_ids == [7]


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x"}, "model"),
    ({"model": "m"}, "prompt"),
    ({"model": "m", "prompt": "x", "prompt_token_ids": [1]}, "prompt"),
    ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
    ({"model": "m", "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"model": "m", "prompt": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"model": "m", "prompt": "x", "n": True}, "n"),
    ({"model": "m", "prompt": "x", "stop": [1]}, "stop"),
    ({"model": "m", "prompt": "x", "logit_bias": {"a": 1}}, "logit_bias"),
    ({"model": "m", "prompt": "x", "bogus": 1}, "bogus"),
    ({"model": "m", "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": "m", "prompt": "x", "grammar": "root ::= \"a\"", "regex": "a+"}, "regex"),
    ({"model": "m", "prompt": "x", "choice": [1, 2]}, "choice"),
    ({"model": "m", "prompt": "x", "response_format": {"type": "xml"}}, "response_format"),
    ({"model": "m", "prompt": "x", "priority": 10**6}, "priority"),
    ({"model": "m", "prompt": "x", "speculative": {"method": "magic"}}, "speculative"),
])
def test_completion_refusals_name_the_field(body, param):
    assert refused(parse_completion, body).param == param


def test_body_must_be_an_object():
    assert "JSON object" in refused(parse_completion, [1, 2]).message


def test_chat_messages_and_logprobs():
    r = parse_chat({"model": "m", "messages": [{"role": "system", "content": "be brief"},
                                                {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                    "logprobs": True, "top_logprobs": 3, "max_completion_tokens": 5})
    assert r.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert r.sampling["logprobs"] == 3 and r.sampling["max_tokens"] == 5
    assert parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}]}).sampling["max_tokens"] is None


@pytest.mark.parametrize("body,param", [
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0]"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "prompt": "x"}, "prompt"),
])
def test_chat_refusals(body, param):
    assert refused(parse_chat, body).param == param


def test_structured_output_kinds():
    js = parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}],
                     "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": '{"type": "object"}'}}})
    assert js.structured == {"kind": "json_schema", "spec": {"type": "object"}}
    assert parse_completion({"model": "m", "prompt": "x", "choice": ["yes", "no"]}).structured == \
        {"kind": "choice", "spec": ["yes", "no"]}
    assert parse_completion({"model": "m", "prompt": "x", "response_format": {"type": "text"}}).structured is None


def test_token_bucket_refills_and_says_when():
    b = TokenBucket(rate=10.0, capacity=20.0, updated=0.0)
    assert b.take(20, now=0.0) is None
    assert b.take(5, now=0.0) == pytest.approx(0.5)
    assert b.take(5, now=0.5) is None
    assert b.take(1000, now=0.5) == pytest.approx(2.0)   # capped at the burst: waits for a full bucket


def test_keys_file_and_authentication(tmp_path):
    f = tmp_path / "keys.yaml"
    f.write_text("keys:\n  - {key: k1, tenant: acme, rate_limit_tokens_per_s: 0.001, burst: 10}\n  - {key: k2, tenant: free}\n")
    auth = Authenticator.from_file(str(f))
    assert auth.authenticate("Bearer k1") == Tenant("acme", 0.001, 10.0)
    assert auth.authenticate("bearer  k2 ").name == "free"
    for bad in (None, "", "k1", "Basic k1", "Bearer nope"):
        with pytest.raises(APIError) as ei:
            auth.authenticate(bad)
        assert ei.value.status == 401
    auth.charge(auth.authenticate("Bearer k1"), 10)
    with pytest.raises(APIError) as ei:
        auth.charge(auth.authenticate("Bearer k1"), 4)
    assert ei.value.status == 429 and 3900 < int(ei.value.retry_after_header) <= 4000   # 4 tokens at 0.001/s
    auth.charge(auth.authenticate("Bearer k2"), 10**9)     # no limit configured


@pytest.mark.parametrize("text,needle", [
    ("keys: 3", "list 'keys'"),
    ("keys:\n  - {tenant: a}", "keys[0] needs a non-empty string 'key'"),
    ("keys:\n  - {key: a, tenant: t, burst: -1}", "keys[0].burst"),
    ("keys:\n  - {key: a, tenant: t}\n  - {key: a, tenant: u}", "repeats a key"),
])
def test_bad_keys_files_say_what_to_fix(tmp_path, text, needle):
    f = tmp_path / "keys.yaml"
    f.write_text(text)
    with pytest.raises(ValueError, match=None) as ei:
        load_keys(str(f))
    assert needle in str(ei.value)


def test_auth_required_unless_disabled():
    with pytest.raises(ValueError, match="INFER_API_KEYS_FILE"):
        Authenticator.from_file("")
    assert Authenticator.from_file("", disabled=True).authenticate(None).name == "anonymous"
