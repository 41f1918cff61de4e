"""mgpo.data.tables: the rows and cells of a benchmark's TSV file."""

from PIL import Image

from mgpo.data.samples import load_samples

HR_HEADER = "index\tquestion\tanswer\tcategory\tA\tB\tC\tD\tcycle_category\timage"


def _b64_png():
    import base64
    import io

    buf = io.BytesIO()
    Image.new("RGB", (80, 60), (1, 2, 3)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_a_tsv_cell_that_opens_a_quote_swallows_no_row(tmp_path):
    rows = [f'{i}\t{chr(34) + "Sign" if i == 1 else "Q?"}\tA\tsingle\ta\tb\tc\td\tcycle1\t{_b64_png()}'
            for i in range(12)]
    (tmp_path / "hr_bench_4k.tsv").write_text(HR_HEADER + "\n" + "\n".join(rows) + "\n")
    ds = load_samples(tmp_path / "hr_bench_4k.tsv")
    assert len(ds) == 12 and not ds.skipped, ds.skipped
    assert ds[1].question == '"Sign' and ds[5].load_image().size == (80, 60)
