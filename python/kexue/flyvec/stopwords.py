"""A short English stop-word list for FlyVec's optional stop-word masking.

Function words (articles, pronouns, auxiliaries, prepositions, conjunctions) occur in nearly every
window of a corpus: on a small corpus one unit learns "the", "of", "and" and wins a large share of
all windows, so every static code carries that unit's bit. Masking them (``stop_words=``) takes
them out of the context half and drops the windows whose target is one of them.
"""

from __future__ import annotations

ENGLISH = frozenset(
    """
a about above after again against all also am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had
has have having he her here hers herself him himself his how i if in into is it its itself just
me more most my myself no nor not now of off on once only or other our ours ourselves out over own
same she should so some such than that the their theirs them themselves then there these they this
those through to too under until up very was we were what when where which while who whom why will
with would you your yours yourself yourselves
""".split()
)
