"""Front ends over the pipeline beyond ``fastdm-edit``: ``fastdm-batch`` (Ray) and ``fastdm-app`` (Gradio).

Both turn a request into an :class:`~fastdm.request.EditRequest` (:mod:`fastdm.service.jobs`) and run it through
:func:`fastdm.request.run` with a pipeline loaded once, so their checks and messages are the CLI's.
Ray and Gradio are optional extras, imported only when these commands run.
"""
