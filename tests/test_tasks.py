import json

import pytest

from lens_laai.tasks.prompts import PromptTemplate, k_shot_prompts, make_batch
from lens_laai.tasks.task import (
    Task,
    TaskError,
    bundled_tasks,
    compose_tasks,
    load_task,
)


def test_bundled_tasks_load_and_are_big_enough():
    names = bundled_tasks()
    assert {"antonym", "synonym", "english-french", "english-german"} <= set(names)
    for name in names:
        task = load_task(name)
        assert len(task) >= 150
        assert len({a for a, _ in task.pairs}) == len(task), f"{name} has duplicate inputs"


def test_split_is_deterministic_and_disjoint():
    task = load_task("antonym")
    a, b = task.split(3, 20, 40), task.split(3, 20, 40)
    assert a.train.pairs == b.train.pairs and a.test.pairs == b.test.pairs
    assert task.split(4, 20, 40).train.pairs != a.train.pairs
    parts = [set(a.train.pairs), set(a.valid.pairs), set(a.test.pairs)]
    assert sum(map(len, parts)) == len(task)
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])


def test_loader_reads_function_vectors_format(tmp_path):
    path = tmp_path / "mytask.json"
    path.write_text(json.dumps([{"input": "a", "output": "b"}, {"input": "c", "output": "d"}]))
    task = load_task(str(path))
    assert task.name == "mytask" and task.pairs == [("a", "b"), ("c", "d")]


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "not valid"),
        ("[]", "non-empty"),
        ('{"input": "a"}', "non-empty JSON list"),
        ('[{"input": "a"}]', "needs both"),
        ('[{"input": "a", "output": ""}]', "non-empty strings"),
    ],
)
def test_bad_task_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(TaskError, match=message):
        Task.from_json(path)


def test_unknown_task_names_the_bundled_ones():
    with pytest.raises(TaskError, match="Bundled tasks: .*antonym"):
        load_task("antonyms")


def test_split_too_large_is_an_error():
    with pytest.raises(TaskError, match="use fewer"):
        Task("t", [("a", "b")] * 5).split(0, 4, 2)


def test_compose_chains_outputs_into_inputs():
    first = Task("ant", [("hot", "cold"), ("big", "small"), ("up", "down")])
    second = Task("fr", [("cold", "froid"), ("small", "petit")])
    assert compose_tasks(first, second).pairs == [("hot", "froid"), ("big", "petit")]


def test_k_shot_prompts_never_show_the_query():
    task = Task("t", [(f"w{i}", f"v{i}") for i in range(10)])
    prompts, targets = k_shot_prompts(task, shots=5, seed=0)
    for (x, y), prompt, target in zip(task.pairs, prompts, targets):
        assert prompt.endswith(f"Q: {x}\nA:") and prompt.count(f"Q: {x}\n") == 1
        assert prompt.count("Q: ") == 6 and target == " " + y


def test_template_renders_demos():
    assert PromptTemplate().render("hot", [("big", "small")]) == "Q: big\nA: small\n\nQ: hot\nA:"


def test_target_that_tokenises_to_nothing_is_an_error(tiny):
    with pytest.raises(TaskError, match="tokenises to nothing"):
        make_batch(tiny.tokenizer, ["Q: a\nA:"], [""])
