from flexmerge.cli import app

app(prog_name="flexmerge")
