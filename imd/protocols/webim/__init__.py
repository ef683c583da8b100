"""The webim/NextIM web protocol: HTTP actions (JSON or JSONP) and the JSONP long-poll, plus
a demo page."""
