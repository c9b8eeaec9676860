"""Hardware in the loop: emulated rings and boards, and the rig that runs bundles on devices.

Emulated devices (:mod:`hil.device`) are SMP servers over file-backed flash, served on a pty at
UART speed (:mod:`hil.serial_device`) or as a Bumble GATT server on a radio-paced link
(:mod:`hil.ble_device`, needs the ``ble`` extra). The rig (:mod:`hil.rig`) runs bundles on them
or on real hardware and writes signed reports.
"""
