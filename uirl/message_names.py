"""Names the server and the silos agree on in Flower messages: actions, config keys, array names.

Defined in uirl (which never imports Flower) and kept free of heavy imports, so that a ClientApp
whose silo work runs in a silo worker (:mod:`uirl.silo_worker`) starts without torch.
"""

#: The ClientApp's query action for the silo's one popularity release (message type ``query.<action>``).
RELEASE_ACTION = "popularity_release"
#: Config key of the SecAgg+ round that is the popularity release (``popularity-noise-shares`` > 1)
#: rather than training: server/secagg.py sets it, client/secagg.py answers it.
RELEASE_TASK = "popularity-release"
#: The silo's released popularity counts, in the release reply's ArrayRecord.
COUNTS_ARRAY = "uirl.popularity-counts"
#: The server's popularity prior, next to the adapter arrays in every train and evaluate message.
PRIOR_ARRAY = "uirl.popularity-prior"
#: With ``local-prior``: the released popularity sum and its noise standard deviation, next to the
#: prior in every evaluate message (:func:`uirl.federated.release_arrays`,
#: :func:`uirl.federated.pop_release`).
RELEASE_SUM_ARRAY = "uirl.popularity-release-sum"
RELEASE_NOISE_ARRAY = "uirl.popularity-release-noise"
