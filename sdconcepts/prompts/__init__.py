"""A1111's prompt syntax as pure functions (no torch): extra-network tags (`network_tags`), emphasis weights and
BREAK (`emphasis`), prompt editing and alternation (`editing`), and 75-token chunks with embedding placeholders
(`chunks`). Anything in sdconcepts may import these modules; they import nothing of sdconcepts but each other.
"""
