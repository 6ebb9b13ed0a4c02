"""Build .dvc/plots_template.html: DVC's plots page with vega inlined, so `dvc plots show`
works without network access (the default page loads vega from a CDN).

Run once at install time (it downloads three npm packages, like pip downloads wheels):
    python scripts/offline_plots.py
The project's .dvc/config points `plots.html_template` at the file it writes.
"""

import io
import sys
import tarfile
import urllib.request
from pathlib import Path

# The versions dvc-render's own page uses.
PACKAGES = {"vega": ("5.20.2", "build/vega.min.js"),
            "vega-lite": ("5.2.0", "build/vega-lite.min.js"),
            "vega-embed": ("6.18.2", "build/vega-embed.min.js")}
REGISTRY = "https://registry.npmjs.org"

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


def fetch(name, version, member):
    url = f"{REGISTRY}/{name}/-/{name}-{version}.tgz"
    with urllib.request.urlopen(url, timeout=60) as r:
        data = r.read()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return tar.extractfile(f"package/{member}").read().decode("utf-8")


def main(out=".dvc/plots_template.html"):
    scripts = []
    for name, (version, member) in PACKAGES.items():
        try:
            js = fetch(name, version, member).replace("</script", "<\\/script")
        except OSError as e:  # no registry access: keep installing, plots just need the CDN
            print(f"offline plots template not built ({name}: {e}); `dvc plots show` will load vega from its CDN")
            return
        scripts.append(f"    <script>/* {name}@{version} */\n{js}\n    </script>")
    html = TEMPLATE.format(inline="\n".join(scripts))
    tmp = Path(out).with_suffix(".tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(out)
    print(f"offline plots template: {out} ({len(html) // 1024} KiB, vega inlined)")


if __name__ == "__main__":
    main(*sys.argv[1:])
