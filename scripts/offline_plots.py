"""Build .dvc/plots_template.html: DVC's plots page with Vega inlined, so `dvc plots show`
works without network access (DVC's default page loads Vega from a CDN).

The Vega, Vega-Lite and Vega-Embed JavaScript comes from the vl-convert-python package, which
ships it (installed by pip with everything else). Run once at install time:
    python scripts/offline_plots.py
The project's .dvc/config points `plots.html_template` at the file it writes.
"""

import sys
from pathlib import Path

import vl_convert

VEGA_LITE = "5.21"  # DVC's plot specs declare the Vega-Lite v5 schema

TEMPLATE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <title>DVC Plot</title>
{inline}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def main(out=".dvc/plots_template.html"):
    # The bundle sets window.vega, vegaLite and vegaEmbed, which DVC's plot divs call.
    js = vl_convert.javascript_bundle(vl_version=VEGA_LITE).replace("</script", "<\\/script")
    inline = (
        f"    <script>/* vega {vl_convert.get_vega_version()}, vega-lite {VEGA_LITE},"
        f" vega-embed {vl_convert.get_vega_embed_version()} (vl-convert-python) */\n{js}\n    </script>"
    )
    html = TEMPLATE.format(inline=inline)
    tmp = Path(out).with_suffix(".tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(out)
    print(f"offline plots template: {out} ({len(html) // 1024} KiB, vega inlined)")


if __name__ == "__main__":
    main(*sys.argv[1:])
