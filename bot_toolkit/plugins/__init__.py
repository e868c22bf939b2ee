"""Plugins shipped with bot_toolkit (see :mod:`bot_toolkit.plugin_host` for how plugins work).

* :mod:`.ping`: answers ``!ping`` and logs every verification the bot completes.
"""
