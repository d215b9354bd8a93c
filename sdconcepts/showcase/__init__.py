"""The showcase: the six uses of textual inversion (and a hypernetwork) on the embedded toy-world models, trained,
measured by the probe and shown as picture grids, figures and pages (``python -m sdconcepts toyworld showcase``).

``recipes`` trains the words and the hypernetwork from toy pictures, ``uses`` generates and measures each use,
``pictures`` draws the grids and locates the shape in a picture, ``render`` writes the figures as Markdown and HTML
(pure: the committed docs/uses.md is its output for the committed figures), ``run`` puts them together in a folder.
"""
