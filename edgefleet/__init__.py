"""The one ``edgefleet`` command, composed of each package's sub-commands."""
