"""Writes the notebooks of this folder (run once after editing; commit the .ipynb files without outputs).

    python notebooks/_build.py

Each notebook is: a title, one cell tagged ``parameters``, library calls, display.
"""

from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).resolve().parent

PARAMS = '''preset = "smoke"      # smoke (seconds) | cpu (embedded default) | gpu | paper
backbone = None       # local checkpoint dir, e.g. "/models/Qwen2-VL-7B-Instruct"; None: the preset's micro backbone
data_root = None      # local M-BEIR root, e.g. "/data/M-BEIR"; None: the synthetic mini-M-BEIR of the preset
nli_path = None       # SimCSE nli_for_simcse.csv; None: <data_root>/nli/nli_for_simcse.csv
cc3m_root = None      # folder with LLaVA CC3M-595K chat.json + images; None: <data_root>/cc3m
seeds = "0,1,2"       # comma-separated training seeds
rows = ""             # "" runs every row of the table; or e.g. "0,4"
results_dir = None    # None: results/<preset>
train = True          # False: train nothing, only collect the finished runs
# your own rows, run with the same seeds and shown beside the paper's (YAML or JSON text), e.g.
# extra_rows = '{"my_tau": {"label": "tau 0.02", "overrides": {"embedder.temperature_init": 0.02}}}'
extra_rows = ""'''

TABLES = {
    "01_embedding_extraction": (
        "table1_embedding_extraction",
        "Table 1: embedding extraction",
        "Causal vs bidirectional attention, last-token vs mean pooling, with and without the "
        'compression prompt ("Summarize above ... in one word:"). Findings T1a-T1d.',
    ),
    "02_instruction_masking": (
        "table2_instruction_masking",
        "Table 2: instructions and instruction masking",
        "Instructions wrapped in `<instruction_start>`/`<instruction_end>`, and whether the span "
        "is removed from the mean pool. Findings T2a, T2b.",
    ),
    "03_progressive_transition": (
        "table3_progressive_transition",
        "Table 3: progressive transition",
        "M-BEIR instruction tuning alone, after a text-only (NLI) stage, and after text-only + "
        "text-image (CC3M) stages. Findings T3a, T3b.",
    ),
    "04_batch_lr_temperature": (
        "table4_batch_lr_temperature",
        "Table 4: batch size, learning rate and temperature",
        "Global batch 480 ... 7680 (divided by the preset; GradCache keeps memory flat), LR, "
        "fixed vs learnable tau. Findings T4a, T4b.",
    ),
    "05_hard_negatives": (
        "table5_hard_negatives",
        "Table 5: hard negative mining",
        "Hard negatives only (the paper's failed row), in-batch + top-k, in-batch + top-k filtered "
        "by a similarity threshold (false-negative filter, 0.7). Findings T5a-T5c.",
    ),
    "06_distillation": (
        "table6_distillation",
        "Table 6: reranker distillation",
        "Teacher = (cos + w P(Yes)) / 2 of a pointwise reranker over the top-50; KL distillation on a "
        "per-task 10% sample, against continuing hard-negative training. Findings T6a, T6b.",
    ),
    "07_main_results": (
        "table7_main_results",
        "Tables 7/8: main results, local and global pools",
        "The full pipeline (NLI -> CC3M -> M-BEIR -> hard negatives -> distillation), all 16 rows. "
        "Give `checkpoint` to evaluate a released U-MARVEL model as-is.",
    ),
}


# diagnostic rows (``explain: true``) and their paired ``checks`` in the table's YAML
CHECKS = {
    "01_embedding_extraction": (
        "## Why T1b (causal + mean collapses) may not show here\n\n"
        "The paper's largest Table 1 effect is causal + mean + prompt at 33.7 vs 56.6 for causal + last + prompt "
        "(a gap of -22.9). A full-fine-tuning probe at micro scale did not show it (`docs/micro_scale.md`). "
        "Rows `ft0`/`ft2` repeat the two causal rows with full fine-tuning of the language model instead of LoRA. "
        "Below, the mean-minus-last gap under each (paired over seeds, bootstrapped over queries): if LoRA and full "
        "fine-tuning give the same sign, the missing collapse is not a LoRA effect. The other candidate causes "
        "(prompt length, model size) are not run here."
    ),
    "05_hard_negatives": (
        "## The false-negative filter at micro scale\n\n"
        "An untrained micro embedder puts most cosines near 0.97, where the paper's absolute 0.7 threshold drops "
        "nearly every mined candidate (the mining report in the stage directory counts them). Row `rel` filters "
        "relative to each query's positive instead (a negative scoring above 0.95 x the positive is dropped; the "
        "margin was fixed before any run). Paired differences:"
    ),
}


# notebook 02: the confusion that instructions fix
WRONG_MODALITY = (
    "## Wrong modality in the global pool\n\n"
    "M-BEIR builds the task rows of a dataset from one item set (MSCOCO's task-0 images are the task-3 queries, "
    "its task-3 captions the task-0 queries; likewise VisualNews and Fashion200K 0/3, OVEN and INFOSEEK 6/8), so the "
    "global pool holds the same item in several modalities, and the synthetic data is built the same way "
    "(`docs/synthetic_data.md`). Without an instruction a query can retrieve its twin in the wrong modality. "
    "Below: the percentage of each row's global top-5 candidates whose modality differs from the task's target "
    "modality (mean over seeds), over all dataset-task rows, over the rows with twins, and over the others."
)


def code(src, tags=None):
    c = nbf.v4.new_code_cell(src)
    if tags:
        c.metadata["tags"] = tags
    return c


def md(src):
    return nbf.v4.new_markdown_cell(src)


def notebook(cells, name):
    nb = nbf.v4.new_notebook()
    nb.cells = cells
    for i, c in enumerate(
        cells
    ):  # stable ids: rebuilding leaves unchanged notebooks byte-identical
        c["id"] = f"{name[:2]}-cell-{i:02d}"
    nb.metadata["kernelspec"] = {
        "name": "umarvel-kit",
        "display_name": "umarvel-kit",
        "language": "python",
    }
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def table_notebook(name, ablation, title, text):
    extra = (
        "\ncheckpoint = None     # a released U-MARVEL checkpoint dir to evaluate as-is (no training)"
        if name == "07_main_results"
        else ""
    )
    cells = [
        md(
            f"# {title}\n\n{text}\n\nRun with papermill: `papermill notebooks/{name}.ipynb out.ipynb -p preset cpu`. "
            "Rows x seeds already finished with the same configuration are skipped. Add your own rows with "
            '`-p extra_rows \'{"my_row": {"label": "...", "overrides": {"stage.mbeir.lr": 2.0e-4}}}\'` '
            "(any key of `umarvel_lib/config.py`; a wrong key or type is refused with the valid choices)."
        ),
        code(PARAMS + extra, tags=["parameters"]),
        code(
            "from IPython.display import Markdown, display\n\nfrom umarvel_lib import notebook as nb\n\n"
            f'ABLATION = nb.table("{ablation}", extra_rows)  # the paper\'s rows + yours (validated)'
        ),
        md(
            "## The recipe\n\nWhat each row changes from the table's base, in words (`source`: the paper's row, a "
            "diagnostic row, or yours), then each row's stage plan (optimizer steps as run, global batch and LR "
            "after the preset's scaling, tau):"
        ),
        code(
            'recipe = nb.recipe(ABLATION, preset=preset, results=results_dir)\ndisplay(recipe["rows"])'
        ),
        code(
            "runs = nb.run_table(ABLATION, preset=preset, seeds=seeds, rows=rows, results=results_dir,\n"
            "                    backbone=backbone, data_root=data_root, nli_path=nli_path, cc3m_root=cc3m_root,\n"
            f"                    train={'train and not checkpoint' if name == '07_main_results' else 'train'})"
            "\nruns"
        ),
        code('nb.recipe(ABLATION, preset=preset, results=results_dir)["stage_plan"]'),
    ]
    if name == "05_hard_negatives":
        cells += [
            md(
                "The mining report of each row (seed 0 where it ran): candidates looked at, removed by each "
                "false-negative filter, survivors used, and how queries short of K negatives were filled:"
            ),
            code('nb.recipe(ABLATION, preset=preset, results=results_dir)["mining"]'),
        ]
    if name == "06_distillation":
        cells += [
            md(
                "The mechanisms' own artefacts (percent). The reranker's accuracy on held-out pairs: each dev "
                "query's labelled positive against the 3 hardest non-positives of its row's dev pool, mined by "
                "the hard-negative model; `pairwise`: the positive's P(Yes) above the negative's, `pointwise`: "
                "P(Yes) > 0.5 says Yes to the positive and No to a negative. The fused teacher's agreement with "
                "the labels on the distillation sample: `top1_positive`: its top candidate is a labelled "
                "positive (`recall_top1_positive`: the embedding ranking alone), `mass_on_positives`: the share "
                "of the KL target softmax(teacher / tau) on labelled positives, `list_has_positive`: the "
                "teacher's list holds one at all:"
            ),
            code(
                "recipe = nb.recipe(ABLATION, preset=preset, results=results_dir)\n"
                'display(recipe["reranker"])\nrecipe["teacher"]'
            ),
        ]
    cells += [
        md(
            "## Results beside the paper\n\nMean +- sd over seeds; the figure shows each row as its difference "
            "from the table's baseline row (the first), the paper's (grey) beside ours (blue, 95% CI over seeds x "
            "queries; your rows orange)."
        ),
        code(
            "out = nb.table_outputs(ABLATION, preset=preset, results=results_dir)\n"
            'display(Markdown(out["provenance"]))\nout["table"]'
        ),
        code('display(nb.show(out["figure"]))'),
        md("Per dataset-task headline metric (mean over seeds), one column per row:"),
        code('out["per_task"]'),
        md(
            "Learning curves: training loss over optimizer steps (and the dev retrieval metric where the runs "
            "evaluated periodically), stage boundaries dotted:"
        ),
        code('display(nb.show(out["curves"]))'),
        md(
            "The paper's findings for this table, with paired (seeds x queries) bootstrap statistics:"
        ),
        code('out["findings"]'),
    ]
    if name == "02_instruction_masking":
        cells += [
            md(WRONG_MODALITY),
            code("nb.wrong_modality(ABLATION, preset=preset, results=results_dir)"),
        ]
    if name in ("01_embedding_extraction", "05_hard_negatives"):
        cells += [md(CHECKS[name]), code("nb.checks(ABLATION, preset=preset, results=results_dir)")]
    if name == "07_main_results":
        cells.append(
            code(
                "if checkpoint:\n    display(nb.evaluate_checkpoint(checkpoint, preset=preset, data_root=data_root, "
                "results=results_dir))"
            )
        )
    return notebook(cells, name)


def main():
    for name, (ablation, title, text) in TABLES.items():
        nbf.write(table_notebook(name, ablation, title, text), HERE / f"{name}.ipynb")
    quick = notebook(
        [
            md(
                "# Quickstart: embed an image query with its instruction and rank a few text candidates\n\n"
                "The U-MARVEL model card's demo on real files. With `backbone=None` it uses the preset's micro backbone "
                "(generatively pre-trained, not retrieval-trained, so its ranking is near chance); pass a local "
                "U-MARVEL-Qwen2VL-7B-Instruct directory or a checkpoint trained by notebook 07 to see real retrieval."
            ),
            code(
                'preset = "smoke"\nbackbone = None       # local checkpoint dir (e.g. U-MARVEL-Qwen2VL-7B-Instruct); None: the micro backbone\n'
                "checkpoint = None     # the same as backbone (wins when given); nothing is trained either way\n"
                'data_root = None\nseeds = "0"\nresults_dir = None',
                tags=["parameters"],
            ),
            code(
                "from IPython.display import HTML, display\n\nfrom umarvel_lib import notebook as nb\n\n"
                "demo = nb.quickstart(checkpoint or backbone, preset=preset, data_root=data_root, seed=int(seeds.split(',')[0]))\n"
                "print('embedding dim:', demo['embedding_dim'], ' tau:', round(demo['tau'], 4), ' pooling:', demo['pooling'],\n"
                "      ' instruction span masked:', demo['instruction_mask'])"
            ),
            md(
                "The query's rendered chat prompt (the instruction span between `<instruction_start>` and "
                "`<instruction_end>`), and its tokens: green ones enter the mean-pooled embedding; the instruction span "
                "(red) is left out of the pool when instruction masking is on:"
            ),
            code("print(demo['prompt'])\ndisplay(HTML(demo['tokens_html']))"),
            md(
                "The candidates retrieved from the row's local pool, best first, with cosine and cos/tau:"
            ),
            code(
                "print(f\"first positive at rank {demo['first_positive_rank']} of {demo['pool_size']} candidates\")\n"
                "display(nb.show(demo['figure']))\ndemo['similarity']"
            ),
        ],
        "00_quickstart",
    )
    nbf.write(quick, HERE / "00_quickstart.ipynb")
    report = notebook(
        [
            md(
                "# Report: every reproduced table beside the paper, and the 15 findings\n\nCollects the run directories "
                "under `results/<preset>/` into `REPORT.md` (it imports no model code)."
            ),
            code('preset = "smoke"\nresults_dir = None\nseeds = "0,1,2"', tags=["parameters"]),
            code(
                "from IPython.display import Image, Markdown, display\n\nfrom umarvel_lib import notebook as nb\n\n"
                "path = nb.write_report(preset=preset, results=results_dir)"
            ),
            md(
                "The findings at a glance: one line per finding, our paired difference with its 95% CI coloured by "
                "verdict, the paper's difference as a diamond (positive = the paper's direction):"
            ),
            code(
                "if (path.parent / 'findings.png').is_file():\n    display(Image(filename=str(path.parent / 'findings.png')))"
            ),
            code("display(Markdown(path.read_text()))"),
        ],
        "08_report",
    )
    nbf.write(report, HERE / "08_report.ipynb")


if __name__ == "__main__":
    main()
