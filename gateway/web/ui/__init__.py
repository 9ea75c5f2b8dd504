"""The dashboard under `/ui`: server-rendered pages over the store's read layer, live by SSE.

`routes` registers the pages (`add_ui_routes`); `views` shapes rows for them and the report.
"""
