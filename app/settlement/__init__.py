"""Settlement: collecting what smart accounts owe through their session keys' vouchers.

See ``app.settlement.setup`` for the modules and ``app.settlement.worker`` for how a
collection moves from pending to confirmed or failed.
"""
